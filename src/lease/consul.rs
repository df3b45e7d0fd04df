//! The Consul lease: a Consul session and a KV lock, over Consul's HTTP API.
//!
//! - Acquiring creates a session (`PUT /v1/session/create` with the configured
//!   `TTL` and `LockDelay`, `Behavior: "delete"` and no health checks, so only the
//!   TTL decides its life), then takes the lock with
//!   `PUT /v1/kv/<key>?acquire=<session>` whose body is the [`LeaseHolder`] JSON,
//!   then reads the key back. An attempt that does not get the lock destroys its
//!   session.
//! - The epoch is the key's `ModifyIndex` as read back right after the acquire.
//!   Consul's `LockIndex` is not used: with behavior "delete" an expired session's
//!   key is deleted and recreated at the next acquisition with `LockIndex` 1 again,
//!   whereas `ModifyIndex` is a Raft index, which only grows, and only the holder
//!   writes the key while it holds it.
//! - Renewing is `PUT /v1/session/renew/<session>` followed by a read of the key,
//!   which must still be held by the session at the epoch's index; otherwise the
//!   lease is [`LeaseError::Lost`].
//! - Releasing is `PUT /v1/kv/<key>?release=<session>` then
//!   `PUT /v1/session/destroy/<session>`, in that order: a session destroyed while
//!   it holds the lock would trigger the lock-delay and delete the key.
//! - Watching is a blocking query, `GET /v1/kv/<key>?index=<n>&wait=<ms>ms`, whose
//!   `X-Consul-Index` header (also present on a 404 for a missing key) is the next
//!   [`LeaseState::index`].
//! - The cluster ID is stored as plain text at `<key>/clusterid` (LiteFS's place for
//!   it), created with `?cas=0` so that only the first node's ID is ever stored.
//!
//! Invariants:
//! - [`HeldLease::renew_by`] is half the TTL after the moment the session create or
//!   renew request was *sent*. Consul invalidates a session no sooner than one TTL
//!   after it receives the last renewal (it may wait up to twice that), and only
//!   then can another node acquire, after the lock-delay too. So a node that stops
//!   acting as primary at `renew_by` stops at least TTL/2 before the lease can have
//!   expired anywhere; the margin covers clock-rate differences and the time it
//!   takes to stop writes.
//! - Every request is bounded: half the TTL, at most [`MAX_REQUEST_TIMEOUT`] (a
//!   renewal slower than that would end after `renew_by` anyway); a blocking query
//!   is bounded by its wait plus Consul's jitter (wait/16) plus that.
//! - An attempt to acquire that fails or is cancelled after its session was created
//!   releases the key and destroys the session (in a background task bounded by two
//!   requests when cancelled); whatever is left expires with the session's TTL.
//! - Anything read from Consul is validated: a lease value that is not base64 of the
//!   holder JSON with both fields non-empty, or a KV answer that is not Consul's
//!   JSON, is [`LeaseError::MalformedValue`] naming the key; nothing panics.
//! - The ACL token is sent only as `X-Consul-Token` and never appears in an error
//!   message or in `Debug` output.
//!
//! An `https://` URL (Fly.io's `FLY_CONSUL_URL`) is reached over TLS, verified
//! against the built-in root certificates (see `http`).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use url::Url;

use super::http::{HttpClient, HttpResponse};
use super::{Epoch, HeldLease, Lease, LeaseError, LeaseHolder, LeaseState, Unavailability};
use crate::config::ConsulConfig;

/// The coordinator's name in [`LeaseError::Unavailable`].
const COORDINATOR: &str = "consul";

/// The name of the sessions this lease creates, as shown by Consul.
pub const SESSION_NAME: &str = "ltxfs";

/// The environment variable with the ACL token, used when the URL has no password.
pub const TOKEN_ENV: &str = "CONSUL_HTTP_TOKEN";

/// The last path segment of the cluster ID key, below the lease key (as in LiteFS).
pub const CLUSTER_ID_SEGMENT: &str = "clusterid";

/// The longest a single request other than a blocking query may take.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest wait of a blocking query that Consul accepts.
pub const MAX_WAIT: Duration = Duration::from_secs(600);

/// How many times `check_cluster_id` retries when the key vanishes between its
/// create-if-absent and its read.
const CLUSTER_ID_ATTEMPTS: usize = 3;

/// Why a Consul lease cannot be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConsulSetupError {
    /// `lease.consul.url` is missing.
    #[error("lease.consul.url is required for a Consul lease")]
    MissingUrl,
    /// `lease.consul.key` is missing or only slashes.
    #[error("lease.consul.key is required for a Consul lease")]
    MissingKey,
    /// `lease.consul.ttl` is zero, which Consul takes as "never expires".
    #[error("lease.consul.ttl must be more than zero")]
    ZeroTtl,
    /// The URL cannot be used. `url` has its password replaced by `***`.
    #[error("lease.consul.url {url}: {reason}")]
    BadUrl {
        /// The URL, without its password.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The ACL token has characters an HTTP header cannot carry.
    #[error("the Consul ACL token (from {source_name}) has characters an HTTP header cannot carry")]
    BadToken {
        /// Where the token came from: the URL or the environment variable.
        source_name: &'static str,
    },
}

/// A lease held through a Consul session on a KV key.
#[derive(Clone)]
pub struct ConsulLease {
    api: Arc<ConsulApi>,
}

/// What every request needs; shared with the cleanup of abandoned sessions.
struct ConsulApi {
    client: HttpClient,
    /// `http://host:port`, without credentials or path.
    base: String,
    /// The ACL token, if any.
    token: Option<String>,
    /// The lock key, prefix included, without leading or trailing slashes.
    key: String,
    /// The cluster ID key.
    cluster_id_key: String,
    ttl: Duration,
    lock_delay: Duration,
    /// The bound on every request other than a blocking query.
    request_timeout: Duration,
}

impl fmt::Debug for ConsulLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulLease")
            .field("base", &self.api.base)
            .field("token", &self.api.token.as_ref().map(|_| "***"))
            .field("key", &self.api.key)
            .field("ttl", &self.api.ttl)
            .field("lock_delay", &self.api.lock_delay)
            .finish()
    }
}

impl ConsulLease {
    /// A Consul lease from `lease.consul`, with the ACL token from the URL's
    /// password or else from `CONSUL_HTTP_TOKEN`.
    pub fn new(config: &ConsulConfig) -> Result<ConsulLease, ConsulSetupError> {
        ConsulLease::with_env_token(config, std::env::var(TOKEN_ENV).ok())
    }

    /// Like [`ConsulLease::new`], with the value of `CONSUL_HTTP_TOKEN` given
    /// instead of read from the environment.
    pub fn with_env_token(
        config: &ConsulConfig,
        env_token: Option<String>,
    ) -> Result<ConsulLease, ConsulSetupError> {
        let url = config.url.as_deref().ok_or(ConsulSetupError::MissingUrl)?;
        let parsed = parse_url(url).map_err(|reason| ConsulSetupError::BadUrl {
            url: redact_url(url),
            reason,
        })?;
        let own_key = join_key("", config.key.as_deref().unwrap_or(""));
        if own_key.is_empty() {
            return Err(ConsulSetupError::MissingKey);
        }
        let key = join_key(&parsed.prefix, &own_key);
        if config.ttl.is_zero() {
            return Err(ConsulSetupError::ZeroTtl);
        }
        let (token, source_name) = match parsed.password.filter(|token| !token.is_empty()) {
            Some(token) => (Some(token), "the URL"),
            None => (env_token.filter(|token| !token.is_empty()), TOKEN_ENV),
        };
        let bad_token = token
            .as_deref()
            .is_some_and(|token| hyper::header::HeaderValue::from_str(token).is_err());
        if bad_token {
            return Err(ConsulSetupError::BadToken { source_name });
        }
        Ok(ConsulLease {
            api: Arc::new(ConsulApi {
                client: HttpClient::new(),
                base: parsed.base,
                token,
                cluster_id_key: format!("{key}/{CLUSTER_ID_SEGMENT}"),
                key,
                ttl: config.ttl,
                lock_delay: config.lock_delay,
                request_timeout: (config.ttl / 2).min(MAX_REQUEST_TIMEOUT),
            }),
        })
    }

    /// The lock key, URL prefix included.
    pub fn key(&self) -> &str {
        &self.api.key
    }

    /// The key holding the cluster ID.
    pub fn cluster_id_key(&self) -> &str {
        &self.api.cluster_id_key
    }
}

#[async_trait::async_trait]
impl Lease for ConsulLease {
    fn ttl(&self) -> Duration {
        self.api.ttl
    }

    async fn try_acquire(&self, me: &LeaseHolder) -> Result<Option<HeldLease>, LeaseError> {
        let api = &self.api;
        let value = serde_json::to_vec(me).map_err(|error| LeaseError::MalformedValue {
            key: api.key.clone(),
            reason: format!("cannot encode this node's lease value: {error}"),
        })?;
        let started = Instant::now();
        let session = api.create_session().await?;
        let mut guard = SessionGuard {
            api: Arc::clone(api),
            session: Some(session.clone()),
        };
        let path = format!("{}?acquire={}", kv_path(&api.key), encode(&session));
        let response = api.call(Method::PUT, &path, Bytes::from(value)).await?;
        if !api.boolean_answer(&path, &response)? {
            guard.abandon().await;
            return Ok(None);
        }
        let (entry, _) = api.read_key(&api.key, "", api.request_timeout).await?;
        match entry {
            Some(entry) if entry.session.as_deref() == Some(session.as_str()) => {
                guard.keep();
                Ok(Some(HeldLease {
                    epoch: Epoch(entry.modify_index),
                    handle: session,
                    renew_by: started + api.ttl / 2,
                }))
            }
            // The session lost the key between the acquire and the read.
            _ => {
                guard.abandon().await;
                Ok(None)
            }
        }
    }

    async fn renew(&self, held: &HeldLease) -> Result<HeldLease, LeaseError> {
        let api = &self.api;
        let started = Instant::now();
        let path = format!("/v1/session/renew/{}", encode(&held.handle));
        let response = api.call(Method::PUT, &path, Bytes::new()).await?;
        let alive = match response.status {
            StatusCode::NOT_FOUND => false,
            // Older Consul versions answer 200 with `null` for an unknown session.
            StatusCode::OK => matches!(
                serde_json::from_slice::<serde_json::Value>(&response.body),
                Ok(serde_json::Value::Array(sessions)) if !sessions.is_empty()
            ),
            _ => return Err(api.refused(&path, &response)),
        };
        if !alive {
            return Err(LeaseError::Lost(format!(
                "Consul session {} has expired or was destroyed",
                held.handle
            )));
        }
        let (entry, _) = api.read_key(&api.key, "", api.request_timeout).await?;
        match entry {
            Some(entry)
                if entry.session.as_deref() == Some(held.handle.as_str())
                    && entry.modify_index == held.epoch.0 =>
            {
                Ok(HeldLease {
                    renew_by: started + api.ttl / 2,
                    ..held.clone()
                })
            }
            Some(entry) if entry.session.as_deref() == Some(held.handle.as_str()) => {
                Err(LeaseError::Lost(format!(
                    "the value under Consul key {:?} was rewritten by someone else (index {} instead of {})",
                    api.key, entry.modify_index, held.epoch.0
                )))
            }
            _ => Err(LeaseError::Lost(format!(
                "Consul key {:?} is no longer held by session {}",
                api.key, held.handle
            ))),
        }
    }

    async fn release(&self, held: &HeldLease) -> Result<(), LeaseError> {
        let released = self.api.release_key(&held.handle).await;
        let destroyed = self.api.destroy_session(&held.handle).await;
        released.and(destroyed)
    }

    async fn watch(&self, since: Option<u64>, wait: Duration) -> Result<LeaseState, LeaseError> {
        let api = &self.api;
        // Consul takes a missing or zero wait as its default of five minutes, so a
        // zero wait is an ordinary read.
        let (query, timeout) = match since {
            Some(index) if wait >= Duration::from_millis(1) => {
                let wait = wait.min(MAX_WAIT);
                (
                    format!("?index={index}&wait={}ms", wait.as_millis()),
                    wait + wait / 16 + api.request_timeout,
                )
            }
            _ => (String::new(), api.request_timeout),
        };
        let (entry, index) = api.read_key(&api.key, &query, timeout).await?;
        let holder = match entry {
            Some(entry) => entry.holder(&api.key)?,
            None => None,
        };
        // Consul's advice: an index of zero must be treated as 1, or the next
        // blocking query would return at once.
        Ok(LeaseState {
            holder,
            index: index.max(1),
        })
    }

    async fn check_cluster_id(&self, local: &str) -> Result<String, LeaseError> {
        let api = &self.api;
        if local.trim().is_empty() {
            return Err(LeaseError::MalformedValue {
                key: api.cluster_id_key.clone(),
                reason: "refusing to store an empty cluster ID".to_string(),
            });
        }
        let create = format!("{}?cas=0", kv_path(&api.cluster_id_key));
        for _ in 0..CLUSTER_ID_ATTEMPTS {
            let response = api
                .call(Method::PUT, &create, Bytes::from(local.to_string()))
                .await?;
            if api.boolean_answer(&create, &response)? {
                return Ok(local.to_string());
            }
            let (entry, _) = api
                .read_key(&api.cluster_id_key, "", api.request_timeout)
                .await?;
            // A key deleted since the create attempt: try to create it again.
            let Some(entry) = entry else { continue };
            let remote = entry.cluster_id(&api.cluster_id_key)?;
            if remote != local {
                return Err(LeaseError::ClusterMismatch {
                    local: local.to_string(),
                    remote,
                });
            }
            return Ok(remote);
        }
        Err(LeaseError::Unavailable {
            coordinator: COORDINATOR,
            url: format!("{}{}", api.base, kv_path(&api.cluster_id_key)),
            reason: Unavailability::KeyKeptDisappearing {
                attempts: CLUSTER_ID_ATTEMPTS,
            },
        })
    }
}

impl ConsulApi {
    /// Sends one request (bounded by the request timeout) and returns any answer.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<HttpResponse, LeaseError> {
        self.call_within(method, path, body, self.request_timeout)
            .await
    }

    /// Sends one request bounded by `timeout`.
    async fn call_within(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<HttpResponse, LeaseError> {
        let url = format!("{}{path}", self.base);
        let headers: Vec<(&str, &str)> = self
            .token
            .as_deref()
            .map(|token| ("X-Consul-Token", token))
            .into_iter()
            .collect();
        self.client
            .request(method, &url, &headers, body, timeout)
            .await
            .map_err(|error| error.into_lease_error(COORDINATOR, &url))
    }

    /// The error for an answer that is not the success Consul documents.
    fn refused(&self, path: &str, response: &HttpResponse) -> LeaseError {
        LeaseError::Unavailable {
            coordinator: COORDINATOR,
            url: format!("{}{path}", self.base),
            reason: Unavailability::Status {
                status: response.status,
                body: response.body_excerpt(),
            },
        }
    }

    /// Reads the `true` or `false` that KV writes and session destroys answer.
    fn boolean_answer(&self, path: &str, response: &HttpResponse) -> Result<bool, LeaseError> {
        if response.status != StatusCode::OK {
            return Err(self.refused(path, response));
        }
        match response.body.trim_ascii() {
            b"true" => Ok(true),
            b"false" => Ok(false),
            _ => Err(LeaseError::Unavailable {
                coordinator: COORDINATOR,
                url: format!("{}{path}", self.base),
                reason: Unavailability::BadAnswer(format!(
                    "expected `true` or `false`, got {:?}",
                    response.body_excerpt()
                )),
            }),
        }
    }

    /// Creates a session with the configured TTL and lock-delay and returns its ID.
    async fn create_session(&self) -> Result<String, LeaseError> {
        let path = "/v1/session/create";
        let body = serde_json::json!({
            "Name": SESSION_NAME,
            "TTL": go_duration(self.ttl),
            "LockDelay": go_duration(self.lock_delay),
            "Behavior": "delete",
            "NodeChecks": [],
        });
        let response = self
            .call(Method::PUT, path, Bytes::from(body.to_string()))
            .await?;
        if response.status != StatusCode::OK {
            return Err(self.refused(path, &response));
        }
        #[derive(serde::Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        match serde_json::from_slice::<Created>(&response.body) {
            Ok(created) if !created.id.is_empty() => Ok(created.id),
            _ => Err(LeaseError::Unavailable {
                coordinator: COORDINATOR,
                url: format!("{}{path}", self.base),
                reason: Unavailability::BadAnswer(format!(
                    "no session ID in {:?}",
                    response.body_excerpt()
                )),
            }),
        }
    }

    /// Releases the lock key if `session` holds it; `false` when it did not.
    async fn release_key(&self, session: &str) -> Result<bool, LeaseError> {
        let path = format!("{}?release={}", kv_path(&self.key), encode(session));
        let response = self.call(Method::PUT, &path, Bytes::new()).await?;
        self.boolean_answer(&path, &response)
    }

    /// Destroys `session` (a session that no longer exists is not an error).
    async fn destroy_session(&self, session: &str) -> Result<(), LeaseError> {
        let path = format!("/v1/session/destroy/{}", encode(session));
        let response = self.call(Method::PUT, &path, Bytes::new()).await?;
        match response.status {
            StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.refused(&path, &response)),
        }
    }

    /// Gives up a session that may hold the key: releases, then destroys it, so
    /// no lock-delay is triggered. Failures are only logged: the session expires
    /// with its TTL anyway.
    async fn abandon(&self, session: &str) {
        if let Err(error) = self.release_key(session).await {
            tracing::warn!(%error, session, "could not release the Consul lease key");
        }
        if let Err(error) = self.destroy_session(session).await {
            tracing::warn!(%error, session, "could not destroy the Consul session; it will expire");
        }
    }

    /// Reads `key` with `query` (empty, or a blocking query's `?index=…&wait=…`):
    /// its entry, or `None` when it does not exist, and the `X-Consul-Index`.
    async fn read_key(
        &self,
        key: &str,
        query: &str,
        timeout: Duration,
    ) -> Result<(Option<KvEntry>, u64), LeaseError> {
        let path = format!("{}{query}", kv_path(key));
        let response = self
            .call_within(Method::GET, &path, Bytes::new(), timeout)
            .await?;
        let entry = match response.status {
            StatusCode::OK => Some(KvEntry::parse(key, &response.body)?),
            StatusCode::NOT_FOUND => None,
            _ => return Err(self.refused(&path, &response)),
        };
        let index = response
            .header("X-Consul-Index")
            .and_then(|index| index.parse::<u64>().ok())
            .ok_or_else(|| LeaseError::Unavailable {
                coordinator: COORDINATOR,
                url: format!("{}{path}", self.base),
                reason: Unavailability::BadAnswer(
                    "the answer has no valid X-Consul-Index header".to_string(),
                ),
            })?;
        Ok((entry, index))
    }
}

/// A session created for an acquisition, destroyed unless [`SessionGuard::keep`]
/// is called: explicitly by [`SessionGuard::abandon`], or by a background task
/// when the guard is dropped (an error, or a cancelled acquisition).
struct SessionGuard {
    api: Arc<ConsulApi>,
    /// The session still to clean up.
    session: Option<String>,
}

impl SessionGuard {
    /// The acquisition succeeded: the session now belongs to the held lease.
    fn keep(&mut self) {
        self.session = None;
    }

    /// Releases the key and destroys the session now.
    async fn abandon(&mut self) {
        if let Some(session) = self.session.take() {
            self.api.abandon(&session).await;
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // Without a runtime (shutting down) the session simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let api = Arc::clone(&self.api);
            runtime.spawn(async move { api.abandon(&session).await });
        }
    }
}

/// One KV entry, as far as the lease needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KvEntry {
    /// The session holding the key's lock, if any.
    session: Option<String>,
    /// The Raft index of the key's last write.
    modify_index: u64,
    /// The decoded value (Consul sends it in base64).
    value: Vec<u8>,
}

impl KvEntry {
    /// Parses Consul's answer to `GET /v1/kv/<key>`: a JSON array of one entry.
    fn parse(key: &str, body: &[u8]) -> Result<KvEntry, LeaseError> {
        #[derive(serde::Deserialize)]
        struct Raw {
            #[serde(rename = "Key")]
            key: String,
            #[serde(rename = "ModifyIndex")]
            modify_index: u64,
            #[serde(rename = "Session", default)]
            session: Option<String>,
            #[serde(rename = "Value", default)]
            value: Option<String>,
        }
        let malformed = |reason: String| LeaseError::MalformedValue {
            key: key.to_string(),
            reason,
        };
        let entries: Vec<Raw> = serde_json::from_slice(body).map_err(|error| {
            malformed(format!("Consul's answer is not a KV entry list: {error}"))
        })?;
        let raw = entries
            .into_iter()
            .find(|raw| raw.key == key)
            .ok_or_else(|| malformed("Consul's answer has no entry for the key".to_string()))?;
        let value = match raw.value.as_deref() {
            None | Some("") => Vec::new(),
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|error| malformed(format!("the value is not valid base64: {error}")))?,
        };
        Ok(KvEntry {
            session: raw.session.filter(|session| !session.is_empty()),
            modify_index: raw.modify_index,
            value,
        })
    }

    /// The holder and epoch when a session holds the lock; its value must then be
    /// the holder JSON with both fields non-empty.
    fn holder(&self, key: &str) -> Result<Option<(LeaseHolder, Epoch)>, LeaseError> {
        if self.session.is_none() {
            return Ok(None);
        }
        let malformed = |reason: String| LeaseError::MalformedValue {
            key: key.to_string(),
            reason,
        };
        let expected = "expected {\"hostname\": ..., \"advertise-url\": ...}";
        // Only an object: serde would also take a two-element array for the struct.
        let holder: LeaseHolder = match serde_json::from_slice(&self.value) {
            Ok(object @ serde_json::Value::Object(_)) => serde_json::from_value(object)
                .map_err(|error| malformed(format!("{expected}: {error}")))?,
            Ok(_) => return Err(malformed(format!("{expected}: not a JSON object"))),
            Err(error) => return Err(malformed(format!("{expected}: {error}"))),
        };
        if holder.hostname.is_empty() || holder.advertise_url.is_empty() {
            return Err(malformed(
                "the hostname and advertise-url must not be empty".to_string(),
            ));
        }
        Ok(Some((holder, Epoch(self.modify_index))))
    }

    /// The cluster ID stored in this entry: non-empty UTF-8 text.
    fn cluster_id(&self, key: &str) -> Result<String, LeaseError> {
        match std::str::from_utf8(&self.value) {
            Ok(text) if !text.trim().is_empty() => Ok(text.to_string()),
            _ => Err(LeaseError::MalformedValue {
                key: key.to_string(),
                reason: "the cluster ID must be non-empty UTF-8 text".to_string(),
            }),
        }
    }
}

/// The parts of `lease.consul.url` the lease uses.
#[derive(Debug, PartialEq, Eq)]
struct ParsedUrl {
    /// `http://host:port` or `https://host:port`.
    base: String,
    /// The percent-decoded password, if the URL has one.
    password: Option<String>,
    /// The percent-decoded path: a key prefix.
    prefix: String,
}

/// Splits `http[s]://[user[:password]@]host[:port][/prefix]`.
fn parse_url(text: &str) -> Result<ParsedUrl, String> {
    let url = Url::parse(text).map_err(|error| match error {
        url::ParseError::RelativeUrlWithoutBase => {
            "expected an http:// or https:// URL".to_string()
        }
        url::ParseError::EmptyHost => "the URL has no host".to_string(),
        error => format!("not a usable URL: {error}"),
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("expected an http:// or https:// URL".to_string());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a query or fragment is not allowed".to_string());
    }
    let host = match url.host_str() {
        Some(host) if !host.is_empty() => host,
        _ => return Err("the URL has no host".to_string()),
    };
    let base = match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    };
    Ok(ParsedUrl {
        base,
        password: url.password().map(percent_decode).transpose()?,
        prefix: percent_decode(url.path())?,
    })
}

/// `url` with its user information (which may hold the token) replaced by `***`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://***@{host}{path}"),
        None => url.to_string(),
    }
}

/// Decodes `%XX` escapes; a `%` not followed by two hex digits is an error.
fn percent_decode(text: &str) -> Result<String, String> {
    let malformed = text.split('%').skip(1).any(|after| {
        after
            .get(..2)
            .is_none_or(|hex| !hex.bytes().all(|byte| byte.is_ascii_hexdigit()))
    });
    if malformed {
        return Err(format!("bad percent escape in {text:?}"));
    }
    percent_decode_str(text)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

/// What [`encode`] escapes: everything but RFC 3986's unreserved characters and
/// `/`.
const KEY_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Percent-encodes everything but RFC 3986's unreserved characters and `/`.
fn encode(text: &str) -> String {
    utf8_percent_encode(text, KEY_ESCAPES).to_string()
}

/// The KV API path of `key`.
fn kv_path(key: &str) -> String {
    format!("/v1/kv/{}", encode(key))
}

/// The prefix and key joined with single slashes, without empty segments
/// (`a/` + `/b` = `a/b`), as LiteFS's `path.Join`.
fn join_key(prefix: &str, key: &str) -> String {
    prefix
        .split('/')
        .chain(key.split('/'))
        .filter(|segment| !segment.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// A duration in Go's syntax, as Consul parses it: whole seconds, else whole
/// milliseconds, else nanoseconds.
fn go_duration(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{}s", duration.as_secs())
    } else if duration.subsec_nanos() % 1_000_000 == 0 {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{}ns", duration.as_nanos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, key: &str) -> ConsulConfig {
        ConsulConfig {
            url: Some(url.to_string()),
            key: Some(key.to_string()),
            ..ConsulConfig::default()
        }
    }

    #[test]
    fn urls_give_the_base_the_token_and_the_key_prefix() {
        assert_eq!(
            parse_url("http://:s%2Fecret@consul.local:8500/litefs/app/").unwrap(),
            ParsedUrl {
                base: "http://consul.local:8500".to_string(),
                password: Some("s/ecret".to_string()),
                prefix: "/litefs/app/".to_string(),
            }
        );
        assert_eq!(
            parse_url("http://127.0.0.1:8500").unwrap(),
            ParsedUrl {
                base: "http://127.0.0.1:8500".to_string(),
                password: None,
                prefix: "/".to_string(),
            }
        );
        assert_eq!(
            parse_url("https://h:8443/p").unwrap().base,
            "https://h:8443"
        );
        assert_eq!(parse_url("https://h:443/p").unwrap().base, "https://h");
        assert!(parse_url("ftp://h").unwrap_err().contains("https://"));
        assert!(parse_url("consul:8500").is_err());
        assert!(parse_url("http://h/x?y").is_err());
        assert!(parse_url("http://:t@/x").is_err());
        assert!(parse_url("http://h/%zz").is_err());
    }

    #[test]
    fn the_token_comes_from_the_url_before_the_environment_and_is_never_shown() {
        let lease = ConsulLease::with_env_token(
            &config("http://:from-url@h:1/pre", "key"),
            Some("from-env".to_string()),
        )
        .unwrap();
        assert_eq!(lease.api.token.as_deref(), Some("from-url"));
        assert_eq!(lease.key(), "pre/key");
        assert_eq!(lease.cluster_id_key(), "pre/key/clusterid");
        assert!(!format!("{lease:?}").contains("from-url"));

        let lease =
            ConsulLease::with_env_token(&config("http://h:1", "/k/"), Some("from-env".to_string()))
                .unwrap();
        assert_eq!(lease.api.token.as_deref(), Some("from-env"));
        assert_eq!(lease.key(), "k");

        let error = ConsulLease::with_env_token(&config("https://:tok@h/x?q", "k"), None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("https://***@h/x?q"), "{error}");
        assert!(!error.contains("tok@"), "{error}");
    }

    #[test]
    fn bad_settings_are_refused() {
        let missing = ConsulConfig::default();
        assert!(matches!(
            ConsulLease::with_env_token(&missing, None),
            Err(ConsulSetupError::MissingUrl)
        ));
        assert!(matches!(
            ConsulLease::with_env_token(&config("http://h", "//"), None),
            Err(ConsulSetupError::MissingKey)
        ));
        assert!(matches!(
            ConsulLease::with_env_token(&config("http://h/prefix", ""), None),
            Err(ConsulSetupError::MissingKey)
        ));
        let zero = ConsulConfig {
            ttl: Duration::ZERO,
            ..config("http://h", "k")
        };
        assert!(matches!(
            ConsulLease::with_env_token(&zero, None),
            Err(ConsulSetupError::ZeroTtl)
        ));
        assert!(matches!(
            ConsulLease::with_env_token(&config("http://h", "k"), Some("a\nb".to_string())),
            Err(ConsulSetupError::BadToken { .. })
        ));
    }

    #[test]
    fn request_timeouts_are_half_the_ttl_at_most_five_seconds() {
        let short = ConsulConfig {
            ttl: Duration::from_secs(1),
            ..config("http://h", "k")
        };
        let lease = ConsulLease::with_env_token(&short, None).unwrap();
        assert_eq!(lease.api.request_timeout, Duration::from_millis(500));
        let lease = ConsulLease::with_env_token(&config("http://h", "k"), None).unwrap();
        assert_eq!(lease.api.request_timeout, MAX_REQUEST_TIMEOUT);
    }

    #[test]
    fn keys_and_durations_are_written_as_consul_reads_them() {
        assert_eq!(join_key("a/b/", "/c/d"), "a/b/c/d");
        assert_eq!(kv_path("a b/ü"), "/v1/kv/a%20b/%C3%BC");
        assert_eq!(encode("x&y=z"), "x%26y%3Dz");
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_nanos(1_000_001)), "1000001ns");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }

    fn entry_json(session: Option<&str>, value: Option<&str>) -> Vec<u8> {
        serde_json::json!([{
            "Key": "k",
            "LockIndex": 1,
            "Flags": 0,
            "CreateIndex": 5,
            "ModifyIndex": 7,
            "Session": session,
            "Value": value,
        }])
        .to_string()
        .into_bytes()
    }

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn a_held_entry_gives_the_holder_at_its_modify_index() {
        let value = b64(r#"{"hostname":"a","advertise-url":"http://a:20202"}"#);
        let entry = KvEntry::parse("k", &entry_json(Some("s1"), Some(&value))).unwrap();
        let (holder, epoch) = entry.holder("k").unwrap().unwrap();
        assert_eq!(holder.hostname, "a");
        assert_eq!(holder.advertise_url, "http://a:20202");
        assert_eq!(epoch, Epoch(7));

        // A released key (no session) has no holder, whatever its value.
        let entry = KvEntry::parse("k", &entry_json(None, Some(&b64("junk")))).unwrap();
        assert_eq!(entry.holder("k").unwrap(), None);
        let entry = KvEntry::parse("k", &entry_json(Some(""), None)).unwrap();
        assert_eq!(entry.holder("k").unwrap(), None);
    }

    #[test]
    fn malformed_values_and_answers_name_the_key() {
        let cases: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            b"{}".to_vec(),
            b"[]".to_vec(),
            br#"[{"Key":"k"}]"#.to_vec(),
            entry_json(Some("s"), Some("!!not base64!!")),
        ];
        for body in cases {
            let error = KvEntry::parse("k", &body).unwrap_err();
            assert!(
                matches!(&error, LeaseError::MalformedValue { key, .. } if key == "k"),
                "{error}"
            );
        }
        let values = [
            "not json",
            r#"{"hostname":"a"}"#,
            r#"{"hostname":"","advertise-url":"http://a"}"#,
            r#"["a","b"]"#,
        ];
        for value in values {
            let entry = KvEntry::parse("k", &entry_json(Some("s"), Some(&b64(value)))).unwrap();
            let error = entry.holder("k").unwrap_err();
            assert!(
                matches!(&error, LeaseError::MalformedValue { key, .. } if key == "k"),
                "{value}: {error}"
            );
        }
        let entry = KvEntry::parse("k", &entry_json(None, None)).unwrap();
        assert!(entry.cluster_id("k/clusterid").is_err());
    }
}
