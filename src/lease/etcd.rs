//! The etcd lease: candidates compete for one etcd key bound to an etcd lease.
//!
//! # Protocol
//!
//! Every call goes through etcd's v3 JSON gateway over HTTP/1.1 (`POST /v3/...`,
//! the paths of etcd 3.4 and later), so building ltxfs needs neither `protoc` nor
//! etcd's gRPC stubs. Keys and values travel in base64, and 64-bit integers come
//! back as JSON strings (protobuf's JSON mapping); fields equal to zero, `false` or
//! empty are left out of answers.
//!
//! - Acquire: read the key; when it is absent, grant an etcd lease of `ttl` seconds
//!   (`/v3/lease/grant`) and run one transaction (`/v3/kv/txn`): if the key's
//!   `create_revision` is 0 (the key does not exist), put this node's
//!   [`LeaseHolder`] JSON under it, bound to the etcd lease; otherwise read it. An
//!   etcd lease that lost the race is revoked at once.
//! - Epoch: the key's `create_revision`, the store revision of the transaction that
//!   created it. Every acquisition creates the key anew and etcd's revision only
//!   grows, so epochs grow across holders, releases and expiries.
//! - Renew: `/v3/lease/keepalive` (one request, one answer), then a read of the key
//!   to check that it still belongs to this etcd lease and epoch (someone may have
//!   deleted or overwritten it by hand).
//! - Release: `/v3/lease/revoke`, which deletes the key with the etcd lease at once.
//! - Watch: `/v3/watch` from revision `since + 1` on the key alone, a streamed
//!   answer of JSON objects; it returns at the first event (or when the position
//!   cannot be watched: compacted away, or ahead of the store), else when the wait
//!   is over, and then reads the key. Renewals do not touch the key, so they never
//!   wake a watch.
//! - Cluster ID: stored at `<key>/clusterid` ([`cluster_id_key`], LiteFS's name for
//!   it beside its Consul key), without an etcd lease so it outlives every holder,
//!   and created only when absent by the same kind of transaction.
//!
//! # Deadlines
//!
//! - Renewal margin: a grant or keep-alive sent at `t` lets etcd expire the lease no
//!   earlier than `t + ttl` (etcd starts the lease's clock when the request arrives,
//!   and a leader change only extends leases). [`HeldLease::renew_by`] is
//!   `t + ttl - ttl / 3`, so after a missed renewal the node has a third of the TTL
//!   (3.3 s with the default 10 s) to stop accepting writes before any other node
//!   can take the lease.
//! - Every request to one endpoint is bounded by a quarter of the TTL, but at least
//!   0.5 s and at most 5 s (connecting, by at most 1 s), so a renewal that fails on
//!   one endpoint can still be tried on the next before `renew_by`. Endpoints are
//!   tried in their configured order, starting from the last one that answered; a
//!   call fails with [`LeaseError::Unavailable`] when no endpoint answered, after at
//!   most the number of endpoints times that bound. A watch adds its wait.
//!
//! # Invariants
//!
//! - This node holds the lease exactly while the key exists bound to its etcd lease
//!   with the `create_revision` of its [`HeldLease::epoch`].
//! - A transaction retried after a lost answer cannot make two holders: its compare
//!   fails on the key it created itself, which is recognised by its etcd lease.
//! - Nothing an endpoint sends is trusted: values are decoded and validated
//!   ([`LeaseError::MalformedValue`]), answers that make no sense are
//!   [`LeaseError::Unavailable`], answer sizes are bounded, and nothing panics.
//! - There are no background tasks of our own: keep-alive is driven by the caller's
//!   [`Lease::renew`]. The only tasks are the HTTP client's connection tasks, which
//!   end with their connection; dropping any call's future cancels it.
//! - TLS and etcd authentication are not supported: endpoints are `http://` URLs.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hyper::Method;
use hyper::body::Bytes;
use serde::de::{DeserializeOwned, Error as _, IgnoredAny};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use super::http::{HttpClient, HttpError, HttpResponse, Opened, build_request, excerpt};
use super::{Epoch, HeldLease, Lease, LeaseError, LeaseHolder, LeaseState, Unavailability};
use crate::config::EtcdConfig;
use crate::http_pool::Schemes;
use stream::JsonStream;
pub use stream::StreamReadError;

/// The coordinator's name in [`LeaseError::Unavailable`].
const COORDINATOR: &str = "etcd";
/// Appended to the lease key to name the cluster ID's key.
const CLUSTER_ID_SUFFIX: &str = "/clusterid";
/// The shortest time one request to one endpoint may take.
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// The longest time one request to one endpoint may take.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest time connecting to one endpoint may take.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a watch waits, whatever the caller asks (it then answers as if the
/// wait were over, which the trait allows).
const MAX_WATCH_WAIT: Duration = Duration::from_secs(24 * 3600);
/// gRPC's NOT_FOUND code, which etcd gives for an unknown etcd lease.
const GRPC_NOT_FOUND: i64 = 5;
/// gRPC codes after which another endpoint may answer (CANCELLED,
/// DEADLINE_EXCEEDED, UNAVAILABLE: e.g. a member without a leader).
const GRPC_TRY_ELSEWHERE: [i64; 3] = [1, 4, 14];
/// The headers of every request.
const JSON_HEADERS: [(&str, &str); 1] = [("content-type", "application/json")];
/// How many bytes of a malformed value an error message quotes.
const QUOTED_VALUE_BYTES: usize = 80;

/// The key that holds the cluster ID of the cluster whose lease key is `key`.
pub fn cluster_id_key(key: &str) -> String {
    format!("{key}{CLUSTER_ID_SUFFIX}")
}

/// Why an [`EtcdLease`] cannot be built from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum EtcdSetupError {
    /// `lease.etcd.endpoints` is empty.
    #[error("lease.etcd.endpoints lists no etcd client URL")]
    NoEndpoints,
    /// `lease.etcd.key` is missing or empty.
    #[error("lease.etcd.key is not set")]
    NoKey,
    /// An endpoint is not a URL this client can use.
    #[error("lease.etcd.endpoints: {url:?} is not a usable etcd client URL: {reason}")]
    BadEndpoint {
        /// The endpoint as configured.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The TTL is not a whole number of seconds of at least one.
    #[error("lease.etcd.ttl: {0:?} is not a whole number of seconds of at least 1s")]
    BadTtl(Duration),
}

/// A lease held in etcd (see the module documentation for the protocol).
pub struct EtcdLease {
    /// The endpoints' base URLs (`http://host:port`), in configured order.
    endpoints: Vec<String>,
    /// The index in `endpoints` of the endpoint that answered last.
    preferred: AtomicUsize,
    /// The lease key.
    key: String,
    /// The lease key in base64.
    key_base64: String,
    /// The cluster ID's key.
    cluster_id_key: String,
    /// The cluster ID's key in base64.
    cluster_id_key_base64: String,
    /// The lease TTL, a whole number of seconds.
    ttl: Duration,
    /// The bound on one request to one endpoint.
    request_timeout: Duration,
    /// The HTTP client.
    http: HttpClient,
}

impl fmt::Debug for EtcdLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLease")
            .field("endpoints", &self.endpoints)
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl EtcdLease {
    /// A client of the lease described by `lease.etcd`. Contacts no endpoint yet.
    pub fn new(config: &EtcdConfig) -> Result<EtcdLease, EtcdSetupError> {
        if config.endpoints.is_empty() {
            return Err(EtcdSetupError::NoEndpoints);
        }
        let endpoints = config
            .endpoints
            .iter()
            .map(|url| normalize_endpoint(url))
            .collect::<Result<Vec<_>, _>>()?;
        let key = match &config.key {
            Some(key) if !key.is_empty() => key.clone(),
            _ => return Err(EtcdSetupError::NoKey),
        };
        let ttl = config.ttl;
        if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
            return Err(EtcdSetupError::BadTtl(ttl));
        }
        let request_timeout = (ttl / 4).clamp(MIN_REQUEST_TIMEOUT, MAX_REQUEST_TIMEOUT);
        let cluster_id_key = cluster_id_key(&key);
        Ok(EtcdLease {
            endpoints,
            preferred: AtomicUsize::new(0),
            key_base64: BASE64.encode(&key),
            key,
            cluster_id_key_base64: BASE64.encode(&cluster_id_key),
            cluster_id_key,
            ttl,
            request_timeout,
            http: HttpClient::reaching(
                Schemes::Http,
                Some(request_timeout.min(MAX_CONNECT_TIMEOUT)),
            ),
        })
    }

    /// Calls `path` on the endpoints in order until one answers, and decodes the
    /// answer as `T`.
    async fn call<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, CallError> {
        let (value, _) = self
            .on_endpoints(path, |url| async move {
                match self.post(&url, body).await {
                    Ok(answer) => interpret(answer.status, &answer.body),
                    Err(error) => Answer::Unusable(Unavailability::NoAnswer(error)),
                }
            })
            .await?;
        Ok(value)
    }

    /// Opens the streamed answer of `path` on the first endpoint (in order) that
    /// accepts it.
    async fn open_stream(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<(JsonStream, String), CallError> {
        self.on_endpoints(path, |url| async move {
            match self.open(&url, body).await {
                Err(error) => Answer::Unusable(Unavailability::NoAnswer(error)),
                Ok(Opened::Stream(body)) => Answer::Done(JsonStream::new(body)),
                Ok(Opened::Answer(answer)) => {
                    match interpret::<IgnoredAny>(answer.status, &answer.body) {
                        Answer::Refused { code, message } => Answer::Refused { code, message },
                        Answer::Done(_) | Answer::Unusable(_) => {
                            Answer::Unusable(Unavailability::Status {
                                status: answer.status,
                                body: answer.body_excerpt(),
                            })
                        }
                    }
                }
            }
        })
        .await
    }

    /// Makes `attempt` with the URL of `path` on each endpoint in turn, from
    /// the one that answered last, until one answers: a success (returned
    /// with that endpoint) or a refusal that any endpoint would give.
    async fn on_endpoints<T, Attempt: Future<Output = Answer<T>>>(
        &self,
        path: &str,
        attempt: impl Fn(String) -> Attempt,
    ) -> Result<(T, String), CallError> {
        let count = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for index in (0..count).map(|i| (first + i) % count) {
            let endpoint = &self.endpoints[index];
            let failure = match attempt(format!("{endpoint}{path}")).await {
                Answer::Done(value) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok((value, endpoint.clone()));
                }
                Answer::Refused { code, message } if !GRPC_TRY_ELSEWHERE.contains(&code) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Err(CallError::Refused {
                        url: endpoint.clone(),
                        code,
                        message,
                    });
                }
                Answer::Refused { code, message } => Unavailability::Refused { code, message },
                Answer::Unusable(reason) => reason,
            };
            failures.push((endpoint.clone(), failure));
        }
        Err(CallError::Unreachable {
            url: self.endpoints.join(", "),
            failures,
        })
    }

    /// POSTs `body` to `url` and reads the whole answer within the request timeout.
    async fn post(&self, url: &str, body: &Value) -> Result<HttpResponse, HttpError> {
        self.http
            .request(
                Method::POST,
                url,
                &JSON_HEADERS,
                Bytes::from(body.to_string()),
                self.request_timeout,
            )
            .await
    }

    /// POSTs `body` to `url` and waits, within the request timeout, for the head
    /// of the answer.
    async fn open(&self, url: &str, body: &Value) -> Result<Opened, HttpError> {
        let request = build_request(
            Method::POST,
            url,
            &JSON_HEADERS,
            Bytes::from(body.to_string()),
        )?;
        self.http.open(request, self.request_timeout).await
    }

    /// An [`LeaseError::Unavailable`] for an answer that makes no sense, naming the
    /// endpoint that answered last.
    fn nonsense(&self, reason: String) -> LeaseError {
        let index = self.preferred.load(Ordering::Relaxed) % self.endpoints.len();
        LeaseError::Unavailable {
            coordinator: COORDINATOR,
            url: self.endpoints[index].clone(),
            reason: Unavailability::BadAnswer(format!("etcd answered nonsense: {reason}")),
        }
    }

    /// Reads `key_base64`: its entry, if any, and the store's revision.
    async fn read_key(&self, key_base64: &str) -> Result<(Option<KeyValue>, u64), LeaseError> {
        let answer: RangeResponse = self
            .call("/v3/kv/range", &json!({ "key": key_base64 }))
            .await?;
        let revision = u64::try_from(answer.header.revision)
            .map_err(|_| self.nonsense(format!("revision {}", answer.header.revision)))?;
        Ok((answer.kvs.into_iter().next(), revision))
    }

    /// Puts `value_base64` under `key_base64` (bound to the etcd lease `lease`, if
    /// any) unless the key exists.
    async fn create_if_absent(
        &self,
        key_base64: &str,
        value_base64: &str,
        lease: Option<i64>,
    ) -> Result<Creation, LeaseError> {
        let mut put = json!({ "key": key_base64, "value": value_base64 });
        if let Some(lease) = lease {
            put["lease"] = Value::String(lease.to_string());
        }
        let request = json!({
            "compare": [{
                "key": key_base64,
                "target": "CREATE",
                "result": "EQUAL",
                "create_revision": "0",
            }],
            "success": [{ "request_put": put }],
            "failure": [{ "request_range": { "key": key_base64 } }],
        });
        let answer: TxnResponse = self.call("/v3/kv/txn", &request).await?;
        if answer.succeeded {
            return Ok(Creation::Created {
                revision: answer.header.revision,
            });
        }
        answer
            .responses
            .into_iter()
            .filter_map(|response| response.response_range)
            .flat_map(|range| range.kvs)
            .next()
            .map(Creation::Exists)
            .ok_or_else(|| self.nonsense("a failed create-if-absent without the key".to_string()))
    }

    /// Revokes the etcd lease `id`, ignoring failures: it expires anyway.
    async fn revoke_quietly(&self, id: i64) {
        if let Err(error) = self.revoke(id).await {
            tracing::debug!(lease = %format_lease_id(id), %error, "could not revoke an unused etcd lease; it will expire");
        }
    }

    /// Revokes the etcd lease `id`, deleting the keys bound to it. An unknown lease
    /// (expired or revoked already) is not an error.
    async fn revoke(&self, id: i64) -> Result<(), LeaseError> {
        match self
            .call::<IgnoredAny>("/v3/lease/revoke", &json!({ "ID": id.to_string() }))
            .await
        {
            Ok(_) => Ok(()),
            Err(CallError::Refused {
                code: GRPC_NOT_FOUND,
                ..
            }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// The holder and epoch recorded in the lease key's entry `kv`.
    fn decode_holder(&self, kv: &KeyValue) -> Result<(LeaseHolder, Epoch), LeaseError> {
        let malformed = |reason: String| LeaseError::MalformedValue {
            key: self.key.clone(),
            reason,
        };
        let bytes = BASE64
            .decode(&kv.value)
            .map_err(|error| malformed(format!("etcd sent a value that is not base64: {error}")))?;
        let quoted = || {
            let end = bytes.len().min(QUOTED_VALUE_BYTES);
            String::from_utf8_lossy(&bytes[..end]).into_owned()
        };
        let holder: LeaseHolder = serde_json::from_slice(&bytes).map_err(|error| {
            malformed(format!(
                "{:?} is not a JSON object with string fields \"hostname\" and \"advertise-url\": {error}",
                quoted()
            ))
        })?;
        if holder.hostname.is_empty() {
            return Err(malformed(format!("{:?} has an empty hostname", quoted())));
        }
        if holder.advertise_url.is_empty() {
            return Err(malformed(format!(
                "{:?} has an empty advertise-url",
                quoted()
            )));
        }
        let epoch = u64::try_from(kv.create_revision)
            .ok()
            .filter(|&revision| revision > 0)
            .ok_or_else(|| self.nonsense(format!("create revision {}", kv.create_revision)))?;
        Ok((holder, Epoch(epoch)))
    }

    /// The lease's current state.
    async fn read_state(&self) -> Result<LeaseState, LeaseError> {
        let (entry, index) = self.read_key(&self.key_base64).await?;
        let holder = entry.map(|kv| self.decode_holder(&kv)).transpose()?;
        Ok(LeaseState { holder, index })
    }

    /// Waits until the lease key changes after revision `since`, or `wait` is
    /// over, or the position cannot be watched.
    async fn wait_for_change(&self, since: u64, wait: Duration) -> Result<(), LeaseError> {
        let until = tokio::time::Instant::now() + wait.min(MAX_WATCH_WAIT);
        let Some(start) = since
            .checked_add(1)
            .and_then(|start| i64::try_from(start).ok())
        else {
            // No etcd revision can follow `since`: nothing to wait for.
            return Ok(());
        };
        let request = json!({
            "create_request": {
                "key": self.key_base64,
                "start_revision": start.to_string(),
            }
        });
        let (mut stream, url) = self.open_stream("/v3/watch", &request).await?;
        let unavailable = |reason: Unavailability| LeaseError::Unavailable {
            coordinator: COORDINATOR,
            url: url.clone(),
            reason,
        };
        loop {
            let envelope =
                match tokio::time::timeout_at(until, stream.next::<WatchEnvelope>()).await {
                    Err(_elapsed) => return Ok(()),
                    Ok(Err(error)) => return Err(unavailable(Unavailability::Watch(error))),
                    Ok(Ok(None)) => {
                        return Err(unavailable(Unavailability::BadAnswer(
                            "etcd ended the watch".to_string(),
                        )));
                    }
                    Ok(Ok(Some(envelope))) => envelope,
                };
            if let Some(error) = envelope.error {
                return Err(unavailable(Unavailability::Refused {
                    code: error.grpc_code,
                    message: error.message,
                }));
            }
            let Some(response) = envelope.result else {
                return Err(unavailable(Unavailability::BadAnswer(
                    "a watch answer without a result".to_string(),
                )));
            };
            if response.canceled || response.compact_revision != 0 {
                // The position is compacted away (or etcd gave up on the watch): the
                // caller gets the current state instead of the changes.
                return Ok(());
            }
            if response.created && response.header.revision < start - 1 {
                // The store is behind the position (restored from a backup, or a new
                // cluster): the position is meaningless, so answer at once.
                return Ok(());
            }
            if !response.events.is_empty() {
                return Ok(());
            }
        }
    }
}

#[async_trait::async_trait]
impl Lease for EtcdLease {
    fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn try_acquire(&self, me: &LeaseHolder) -> Result<Option<HeldLease>, LeaseError> {
        // Most calls find the lease held; one read answers them without granting an
        // etcd lease.
        if let (Some(kv), _) = self.read_key(&self.key_base64).await? {
            self.decode_holder(&kv)?;
            return Ok(None);
        }
        let value = serde_json::to_vec(me).map_err(|error| LeaseError::MalformedValue {
            key: self.key.clone(),
            reason: format!("this node's lease value cannot be encoded: {error}"),
        })?;
        let sent = Instant::now();
        let grant: LeaseGrantResponse = self
            .call("/v3/lease/grant", &json!({ "TTL": self.ttl.as_secs() }))
            .await?;
        if !grant.error.is_empty() || grant.id == 0 || grant.ttl <= 0 {
            return Err(self.nonsense(format!(
                "grant of lease {} for {} s: {:?}",
                grant.id, grant.ttl, grant.error
            )));
        }
        if u64::try_from(grant.ttl).is_ok_and(|granted| granted > self.ttl.as_secs()) {
            // etcd raises TTLs below its minimum (1.5 election timeouts). Deadlines
            // stay computed from the configured TTL, which is safe, only early.
            tracing::warn!(
                configured = self.ttl.as_secs(),
                granted = grant.ttl,
                "etcd granted a longer lease TTL than configured; failover will take longer than lease.etcd.ttl"
            );
        }
        let created = self
            .create_if_absent(&self.key_base64, &BASE64.encode(&value), Some(grant.id))
            .await;
        let revision = match created {
            Ok(Creation::Created { revision }) => revision,
            // A transaction retried on another endpoint after a lost answer finds the
            // key it created itself.
            Ok(Creation::Exists(kv)) if kv.lease == grant.id => kv.create_revision,
            Ok(Creation::Exists(kv)) => {
                self.revoke_quietly(grant.id).await;
                self.decode_holder(&kv)?;
                return Ok(None);
            }
            Err(error) => {
                // The transaction may have succeeded unseen: revoking deletes the key
                // with the etcd lease, so this node cannot hold it unknowingly.
                self.revoke_quietly(grant.id).await;
                return Err(error);
            }
        };
        let Some(epoch) = u64::try_from(revision)
            .ok()
            .filter(|&revision| revision > 0)
        else {
            self.revoke_quietly(grant.id).await;
            return Err(self.nonsense(format!("create revision {revision}")));
        };
        Ok(Some(HeldLease {
            epoch: Epoch(epoch),
            handle: format_lease_id(grant.id),
            renew_by: renew_deadline(sent, self.ttl),
        }))
    }

    async fn renew(&self, held: &HeldLease) -> Result<HeldLease, LeaseError> {
        let id = parse_lease_id(&held.handle)?;
        let sent = Instant::now();
        let answer: KeepAliveEnvelope = self
            .call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))
            .await?;
        if let Some(error) = answer.error {
            return Err(self.nonsense(format!(
                "keep-alive failed: {} (gRPC code {})",
                error.message, error.grpc_code
            )));
        }
        if answer.result.is_none_or(|result| result.ttl <= 0) {
            return Err(LeaseError::Lost(format!(
                "etcd lease {} has expired or was revoked",
                held.handle
            )));
        }
        // The etcd lease lives, but the key could have been deleted or replaced by
        // hand; only the key decides who holds the lease.
        match self.read_key(&self.key_base64).await? {
            (Some(kv), _)
                if kv.lease == id && u64::try_from(kv.create_revision) == Ok(held.epoch.0) =>
            {
                Ok(HeldLease {
                    renew_by: renew_deadline(sent, self.ttl),
                    ..held.clone()
                })
            }
            (Some(kv), _) => Err(LeaseError::Lost(format!(
                "{:?} now belongs to etcd lease {} (epoch {})",
                self.key,
                format_lease_id(kv.lease),
                kv.create_revision
            ))),
            (None, _) => Err(LeaseError::Lost(format!(
                "{:?} was deleted while etcd lease {} lived",
                self.key, held.handle
            ))),
        }
    }

    async fn release(&self, held: &HeldLease) -> Result<(), LeaseError> {
        self.revoke(parse_lease_id(&held.handle)?).await
    }

    async fn watch(&self, since: Option<u64>, wait: Duration) -> Result<LeaseState, LeaseError> {
        if let Some(since) = since {
            self.wait_for_change(since, wait).await?;
        }
        self.read_state().await
    }

    async fn check_cluster_id(&self, local: &str) -> Result<String, LeaseError> {
        let created = self
            .create_if_absent(&self.cluster_id_key_base64, &BASE64.encode(local), None)
            .await?;
        let kv = match created {
            Creation::Created { .. } => return Ok(local.to_string()),
            Creation::Exists(kv) => kv,
        };
        let malformed = |reason: String| LeaseError::MalformedValue {
            key: self.cluster_id_key.clone(),
            reason,
        };
        let bytes = BASE64
            .decode(&kv.value)
            .map_err(|error| malformed(format!("etcd sent a value that is not base64: {error}")))?;
        let stored = String::from_utf8(bytes)
            .map_err(|_| malformed("the cluster ID is not UTF-8".to_string()))?;
        if stored.is_empty() || stored.chars().any(char::is_control) {
            return Err(malformed(format!("{stored:?} is not a cluster ID")));
        }
        if stored != local {
            return Err(LeaseError::ClusterMismatch {
                local: local.to_string(),
                remote: stored,
            });
        }
        Ok(stored)
    }
}

/// `http://host:port` for a configured endpoint (`host:port` means HTTP).
fn normalize_endpoint(url: &str) -> Result<String, EtcdSetupError> {
    let bad = |reason| EtcdSetupError::BadEndpoint {
        url: url.to_string(),
        reason,
    };
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let uri: hyper::Uri = full.parse().map_err(|_| bad("it is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err(bad("TLS to etcd is not supported; use an http:// URL")),
        _ => return Err(bad("only http:// URLs are supported")),
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("it names no host"));
    };
    if authority.as_str().contains('@') {
        return Err(bad("etcd user names and passwords are not supported"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(bad("etcd's API is at the root; remove the path"));
    }
    Ok(format!("http://{authority}"))
}

/// The instant by which a lease granted or renewed by a request sent at `sent`
/// must be renewed: a third of the TTL before etcd could expire it.
fn renew_deadline(sent: Instant, ttl: Duration) -> Instant {
    sent + (ttl - ttl / 3)
}

/// An etcd lease ID as [`HeldLease::handle`]: sixteen hex digits, as `etcdctl`
/// prints it.
fn format_lease_id(id: i64) -> String {
    // etcd's lease IDs are 64-bit patterns; the reinterpretation is lossless.
    format!("{:016x}", id as u64)
}

/// The etcd lease ID in a [`HeldLease::handle`].
fn parse_lease_id(handle: &str) -> Result<i64, LeaseError> {
    match u64::from_str_radix(handle, 16) {
        // The inverse of `format_lease_id`'s lossless reinterpretation.
        Ok(id) if id != 0 => Ok(id as i64),
        _ => Err(LeaseError::Lost(format!(
            "{handle:?} is not an etcd lease ID"
        ))),
    }
}

/// Why a call to etcd failed.
#[derive(Debug)]
enum CallError {
    /// An endpoint answered with an error that another endpoint would repeat.
    Refused {
        /// The endpoint.
        url: String,
        /// The gRPC status code.
        code: i64,
        /// etcd's message.
        message: String,
    },
    /// No endpoint answered usefully.
    Unreachable {
        /// The endpoints tried.
        url: String,
        /// What went wrong with each.
        failures: Vec<(String, Unavailability)>,
    },
}

impl From<CallError> for LeaseError {
    fn from(error: CallError) -> LeaseError {
        match error {
            CallError::Refused { url, code, message } => LeaseError::Unavailable {
                coordinator: COORDINATOR,
                url,
                reason: Unavailability::Refused { code, message },
            },
            CallError::Unreachable { url, failures } => LeaseError::Unavailable {
                coordinator: COORDINATOR,
                url,
                reason: Unavailability::AllEndpoints(failures),
            },
        }
    }
}

/// What one endpoint's answer means.
enum Answer<T> {
    /// A successful answer.
    Done(T),
    /// An error answer with a gRPC status.
    Refused {
        /// The gRPC status code.
        code: i64,
        /// etcd's message.
        message: String,
    },
    /// No answer this request can use (none, or not etcd's); another
    /// endpoint may give one.
    Unusable(Unavailability),
}

/// Decodes one endpoint's answer.
fn interpret<T: DeserializeOwned>(status: hyper::StatusCode, bytes: &[u8]) -> Answer<T> {
    if status.is_success() {
        return match serde_json::from_slice(bytes) {
            Ok(value) => Answer::Done(value),
            Err(error) => Answer::Unusable(Unavailability::BadAnswer(format!(
                "an unreadable answer: {error}"
            ))),
        };
    }
    match serde_json::from_slice::<GatewayError>(bytes) {
        Ok(error) if error.code != 0 => Answer::Refused {
            code: error.code,
            message: error.message,
        },
        _ => Answer::Unusable(Unavailability::Status {
            status,
            body: excerpt(bytes),
        }),
    }
}

/// The outcome of a create-if-absent transaction.
enum Creation {
    /// The key was created at this revision.
    Created {
        /// The transaction's revision, the key's `create_revision`.
        revision: i64,
    },
    /// The key exists; this is its entry.
    Exists(KeyValue),
}

// The gateway's JSON answers: only the fields read here. Integers may come as
// strings or numbers; missing fields are zero or empty.

/// Decodes a 64-bit integer sent as a JSON string or number.
fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Integer {
        Number(i64),
        Text(String),
    }
    match Integer::deserialize(deserializer)? {
        Integer::Number(number) => Ok(number),
        Integer::Text(text) => text.parse().map_err(D::Error::custom),
    }
}

/// An error answer of a unary call.
#[derive(Deserialize)]
struct GatewayError {
    /// The gRPC status code.
    #[serde(default, deserialize_with = "integer")]
    code: i64,
    /// The message.
    #[serde(default)]
    message: String,
}

/// An error inside a streamed answer.
#[derive(Deserialize)]
struct StreamError {
    /// The gRPC status code.
    #[serde(default, deserialize_with = "integer")]
    grpc_code: i64,
    /// The message.
    #[serde(default)]
    message: String,
}

/// The header of every answer.
#[derive(Default, Deserialize)]
struct ResponseHeader {
    /// The store's revision when the answer was made.
    #[serde(default, deserialize_with = "integer")]
    revision: i64,
}

/// `/v3/lease/grant`'s answer.
#[derive(Deserialize)]
struct LeaseGrantResponse {
    /// The etcd lease ID.
    #[serde(rename = "ID", default, deserialize_with = "integer")]
    id: i64,
    /// The granted TTL in seconds.
    #[serde(rename = "TTL", default, deserialize_with = "integer")]
    ttl: i64,
    /// Why nothing was granted.
    #[serde(default)]
    error: String,
}

/// `/v3/lease/keepalive`'s (streamed) answer.
#[derive(Deserialize)]
struct KeepAliveEnvelope {
    /// The answer.
    result: Option<KeepAliveResponse>,
    /// Or the error.
    error: Option<StreamError>,
}

/// A keep-alive answer.
#[derive(Deserialize)]
struct KeepAliveResponse {
    /// The remaining TTL in seconds; absent (zero) when the etcd lease is gone.
    #[serde(rename = "TTL", default, deserialize_with = "integer")]
    ttl: i64,
}

/// One key's entry.
#[derive(Deserialize)]
struct KeyValue {
    /// The revision that created the key.
    #[serde(default, deserialize_with = "integer")]
    create_revision: i64,
    /// The value in base64.
    #[serde(default)]
    value: String,
    /// The etcd lease the key is bound to (0: none).
    #[serde(default, deserialize_with = "integer")]
    lease: i64,
}

/// `/v3/kv/range`'s answer.
#[derive(Deserialize)]
struct RangeResponse {
    /// The header.
    #[serde(default)]
    header: ResponseHeader,
    /// The entries found.
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

/// `/v3/kv/txn`'s answer.
#[derive(Deserialize)]
struct TxnResponse {
    /// The header; its revision is the transaction's.
    #[serde(default)]
    header: ResponseHeader,
    /// Whether the comparisons held.
    #[serde(default)]
    succeeded: bool,
    /// The answers of the operations run.
    #[serde(default)]
    responses: Vec<ResponseOp>,
}

/// One operation's answer in a transaction.
#[derive(Deserialize)]
struct ResponseOp {
    /// A range's answer.
    response_range: Option<RangeResponse>,
}

/// One object of `/v3/watch`'s streamed answer.
#[derive(Deserialize)]
struct WatchEnvelope {
    /// The answer.
    result: Option<WatchResponse>,
    /// Or the error.
    error: Option<StreamError>,
}

/// A watch answer.
#[derive(Deserialize)]
struct WatchResponse {
    /// The header.
    #[serde(default)]
    header: ResponseHeader,
    /// Whether this answer confirms the watch's creation.
    #[serde(default)]
    created: bool,
    /// Whether etcd cancelled the watch.
    #[serde(default)]
    canceled: bool,
    /// Set when the start revision is compacted away.
    #[serde(default, deserialize_with = "integer")]
    compact_revision: i64,
    /// The changes.
    #[serde(default)]
    events: Vec<IgnoredAny>,
}

/// The gateway's streamed answers: concatenated JSON objects.
mod stream {
    use http_body_util::BodyExt as _;
    use hyper::body::Incoming;
    use serde::de::DeserializeOwned;

    use crate::error_chain::error_chain;
    use crate::lease::http::MAX_BODY;

    /// Why a streamed answer could not be read.
    #[derive(Debug, thiserror::Error)]
    pub enum StreamReadError {
        /// One object is larger than [`MAX_BODY`].
        #[error("a streamed object is over {MAX_BODY} bytes")]
        TooLarge,
        /// The answer ended in the middle of an object.
        #[error("the answer ended inside a JSON object")]
        Truncated,
        /// Receiving failed.
        #[error("{}", error_chain(.0))]
        Transport(hyper::Error),
        /// An object is not what was expected.
        #[error("a malformed streamed answer: {0}")]
        Malformed(serde_json::Error),
    }

    /// A streamed answer made of concatenated JSON objects, as the gateway sends
    /// for streaming calls.
    pub(super) struct JsonStream {
        /// The answer's body.
        body: Incoming,
        /// Bytes received and not yet decoded.
        buffer: Vec<u8>,
    }

    impl JsonStream {
        /// The stream of the objects in `body`.
        pub(super) fn new(body: Incoming) -> JsonStream {
            JsonStream {
                body,
                buffer: Vec::new(),
            }
        }

        /// The next object; `None` when the answer ends cleanly. Waits as long as
        /// the server sends nothing: callers bound it.
        pub(super) async fn next<T: DeserializeOwned>(
            &mut self,
        ) -> Result<Option<T>, StreamReadError> {
            loop {
                if let Some(value) = take_object(&mut self.buffer)? {
                    return Ok(Some(value));
                }
                if self.buffer.len() > MAX_BODY {
                    return Err(StreamReadError::TooLarge);
                }
                match self.body.frame().await {
                    None if self.buffer.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                    None => return Err(StreamReadError::Truncated),
                    Some(Err(error)) => return Err(StreamReadError::Transport(error)),
                    Some(Ok(frame)) => {
                        // Trailers carry nothing needed here.
                        if let Ok(data) = frame.into_data() {
                            self.buffer.extend_from_slice(&data);
                        }
                    }
                }
            }
        }
    }

    /// Removes the first complete JSON object from `buffer` and decodes it;
    /// `None` when the buffer holds only part of one (or nothing).
    pub(super) fn take_object<T: DeserializeOwned>(
        buffer: &mut Vec<u8>,
    ) -> Result<Option<T>, StreamReadError> {
        let mut objects = serde_json::Deserializer::from_slice(buffer).into_iter::<T>();
        match objects.next() {
            None => Ok(None),
            Some(Err(error)) if error.is_eof() => Ok(None),
            Some(Err(error)) => Err(StreamReadError::Malformed(error)),
            Some(Ok(value)) => {
                let used = objects.byte_offset();
                buffer.drain(..used);
                Ok(Some(value))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoints: &[&str]) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            key: Some("ltxfs/test".to_string()),
            ttl: Duration::from_secs(10),
        }
    }

    #[test]
    fn endpoints_are_normalized_and_checked() {
        let lease = EtcdLease::new(&config(&["127.0.0.1:2379", "http://etcd-2:2379/"])).unwrap();
        assert_eq!(
            lease.endpoints,
            ["http://127.0.0.1:2379", "http://etcd-2:2379"]
        );
        for bad in [
            "https://etcd:2379",
            "unix:///run/etcd.sock",
            "http://user:pw@etcd:2379",
            "http://etcd:2379/prefix",
            "http://",
            "not a url",
        ] {
            assert!(
                matches!(
                    EtcdLease::new(&config(&[bad])),
                    Err(EtcdSetupError::BadEndpoint { .. })
                ),
                "{bad} was accepted"
            );
        }
        assert!(matches!(
            EtcdLease::new(&config(&[])),
            Err(EtcdSetupError::NoEndpoints)
        ));
        let no_key = EtcdConfig {
            key: None,
            ..config(&["etcd:2379"])
        };
        assert!(matches!(
            EtcdLease::new(&no_key),
            Err(EtcdSetupError::NoKey)
        ));
        let fractional = EtcdConfig {
            ttl: Duration::from_millis(1500),
            ..config(&["etcd:2379"])
        };
        assert!(matches!(
            EtcdLease::new(&fractional),
            Err(EtcdSetupError::BadTtl(_))
        ));
    }

    #[test]
    fn request_timeouts_follow_the_ttl_within_bounds() {
        let timeout = |secs| {
            let config = EtcdConfig {
                ttl: Duration::from_secs(secs),
                ..config(&["etcd:2379"])
            };
            EtcdLease::new(&config).unwrap().request_timeout
        };
        assert_eq!(timeout(1), MIN_REQUEST_TIMEOUT);
        assert_eq!(timeout(10), Duration::from_millis(2500));
        assert_eq!(timeout(60), MAX_REQUEST_TIMEOUT);
    }

    #[test]
    fn the_renewal_deadline_leaves_a_third_of_the_ttl() {
        let now = Instant::now();
        assert_eq!(
            renew_deadline(now, Duration::from_secs(9)),
            now + Duration::from_secs(6)
        );
    }

    #[test]
    fn lease_ids_round_trip_through_handles() {
        for id in [1, 0x694d_7a3b_2c1d_0e0f, -2] {
            assert_eq!(parse_lease_id(&format_lease_id(id)).unwrap(), id);
        }
        assert_eq!(format_lease_id(0x2040), "0000000000002040");
        for bad in ["", "0", "xyz", "1234567890abcdef0", "-1"] {
            assert!(
                matches!(parse_lease_id(bad), Err(LeaseError::Lost(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn gateway_integers_come_as_strings_or_numbers() {
        let kv: KeyValue =
            serde_json::from_str(r#"{"create_revision":"42","lease":7,"value":"eA=="}"#).unwrap();
        assert_eq!((kv.create_revision, kv.lease), (42, 7));
        let empty: KeyValue = serde_json::from_str("{}").unwrap();
        assert_eq!((empty.create_revision, empty.lease), (0, 0));
        assert!(serde_json::from_str::<KeyValue>(r#"{"lease":"seven"}"#).is_err());
        assert!(serde_json::from_str::<KeyValue>(r#"{"lease":null}"#).is_err());
    }

    #[test]
    fn error_answers_are_classified() {
        let refused = interpret::<IgnoredAny>(
            hyper::StatusCode::NOT_FOUND,
            br#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
        );
        assert!(matches!(refused, Answer::Refused { code: 5, .. }));
        let proxy = interpret::<IgnoredAny>(hyper::StatusCode::BAD_GATEWAY, b"<html>");
        assert!(matches!(proxy, Answer::Unusable(_)));
        let garbled = interpret::<RangeResponse>(hyper::StatusCode::OK, b"{\"kvs\": 3}");
        assert!(matches!(garbled, Answer::Unusable(_)));
    }

    #[test]
    fn streamed_objects_are_split_wherever_the_chunks_end() {
        let stream = b"{\"result\":{\"created\":true}}\n{\"result\":{\"events\":[{}]}}\n";
        for cut in 0..stream.len() {
            let mut buffer = Vec::new();
            let mut seen = Vec::new();
            for chunk in [&stream[..cut], &stream[cut..]] {
                buffer.extend_from_slice(chunk);
                while let Some(envelope) =
                    stream::take_object::<WatchEnvelope>(&mut buffer).unwrap()
                {
                    let result = envelope.result.unwrap();
                    seen.push((result.created, result.events.len()));
                }
            }
            assert_eq!(seen, [(true, 0), (false, 1)], "cut at {cut}");
            assert!(buffer.iter().all(u8::is_ascii_whitespace));
        }
        let mut bad = b"{\"result\":}".to_vec();
        assert!(stream::take_object::<WatchEnvelope>(&mut bad).is_err());
    }
}
