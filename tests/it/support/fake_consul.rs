//! A fake Consul agent for the lease tests: the parts of Consul's HTTP API that a
//! lease uses, with Consul's documented semantics, served on `127.0.0.1:0`.
//!
//! - Sessions (`PUT /v1/session/create`, `renew/<id>`, `destroy/<id>`,
//!   `GET /v1/session/info/<id>`): `TTL` (a Go duration between
//!   [`Options::session_ttl_min`] and 24 h, or none), `LockDelay` (a Go duration
//!   string, or a number of nanoseconds, or of seconds when below 1000, as Consul
//!   reads it; 15 s by default), `Behavior` (`release`, the default, or `delete`).
//!   A session not renewed is invalidated [`Options::expiry_factor`] × TTL after
//!   its creation or last renewal: Consul guarantees at least the TTL and may take
//!   up to twice as long. Renewing a missing session is a 404.
//! - Invalidation (expiry or destroy) deletes (behavior `delete`) or releases
//!   (`release`) every key the session holds, and starts the session's lock-delay on
//!   each: during it, `?acquire` of that key answers `false`.
//! - KV (`GET`, `PUT`, `DELETE /v1/kv/<key>`): entries with `CreateIndex`,
//!   `ModifyIndex`, `LockIndex`, `Flags`, `Session` and a base64 `Value` (`null`
//!   when empty); a missing key is a 404 with an empty body. `PUT` supports
//!   `?acquire=<session>` (an unknown session is a 500; a key held by another
//!   session or under lock-delay answers `false`; re-acquiring by the holder
//!   updates the value without a new `LockIndex`), `?release=<session>` (also sets
//!   the value to the body), `?cas=<index>` (`0`: only if absent) and `?flags=`.
//!   `DELETE` supports `?recurse` and `?cas`.
//! - Every write takes the next Raft index. Every answer carries `X-Consul-Index`:
//!   for a key, its `ModifyIndex`; for a missing key, the index of the last KV write
//!   of any key, deletes included (Consul's tombstones). `GET` with `?index=N`
//!   blocks while that index is at most `N`, until the key changes or `?wait`
//!   (default 5 min, at most 10 min) has passed, then answers as usual.
//! - With [`Options::token`], every request must carry it as `X-Consul-Token`
//!   (else 403, `ACL not found`), as with ACLs enabled.
//! - [`FakeConsul::set_stalled`] makes requests hang (a slow or partitioned
//!   Consul) until it is undone.
//!
//! Stricter than Consul, to catch client mistakes: unknown fields in a session
//! body are a 400. Not modelled: datacenters, namespaces, health checks (accepted
//! and ignored), consistency modes (every read is consistent), Consul's random
//! extra wait of up to wait/16.
//!
//! The server runs on its own thread and current-thread runtime; dropping the
//! [`FakeConsul`] stops it and every connection.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

/// Consul's largest KV value.
const MAX_VALUE: usize = 512 * 1024;
/// Consul's default and longest blocking waits.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Consul's default session lock-delay.
const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// Consul's longest session TTL.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// When an unrenewed session is invalidated, as a multiple of its TTL, in
    /// `[1.0, 2.0]`: Consul may take up to twice the TTL. Default 2.
    pub expiry_factor: f64,
    /// Consul's `session_ttl_min`: the shortest TTL accepted. Default 10 s.
    pub session_ttl_min: Duration,
    /// The ACL token every request must carry; `None` for no ACLs.
    pub token: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            expiry_factor: 2.0,
            session_ttl_min: Duration::from_secs(10),
            token: None,
        }
    }
}

/// A running fake Consul agent.
pub struct FakeConsul {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What the server's tasks share.
struct Shared {
    options: Options,
    state: Mutex<State>,
    /// The Raft index after each write; blocking queries wait on it.
    writes: watch::Sender<u64>,
    /// Wakes the expiry task when a session is created.
    sessions_changed: Notify,
    /// Whether requests must hang.
    stalled: watch::Sender<bool>,
}

/// The replicated state.
#[derive(Default)]
struct State {
    /// The last Raft index used.
    index: u64,
    /// The index of the last KV write, deletes included.
    kv_index: u64,
    kv: BTreeMap<String, Entry>,
    /// The index at which each key last changed (deletes included).
    key_changed: HashMap<String, u64>,
    sessions: HashMap<String, Session>,
    /// Keys under lock-delay, until when.
    lock_delays: HashMap<String, Instant>,
    /// Numbers the session IDs.
    sessions_created: u64,
}

struct Entry {
    value: Vec<u8>,
    flags: u64,
    create_index: u64,
    modify_index: u64,
    lock_index: u64,
    session: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behavior {
    Release,
    Delete,
}

struct Session {
    name: String,
    ttl: Option<Duration>,
    lock_delay: Duration,
    behavior: Behavior,
    node_checks: Vec<String>,
    create_index: u64,
    /// When the session is invalidated unless renewed.
    expires: Option<Instant>,
}

impl FakeConsul {
    /// Starts a fake agent on a free loopback port.
    pub fn start(options: Options) -> FakeConsul {
        assert!(
            (1.0..=2.0).contains(&options.expiry_factor),
            "Consul expires sessions between 1 and 2 TTLs"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener
            .set_nonblocking(true)
            .expect("make the listener non-blocking");
        let addr = listener.local_addr().expect("the listener's address");
        let shared = Arc::new(Shared {
            options,
            state: Mutex::new(State {
                // Consul's indexes never start at 0 or 1.
                index: 10,
                kv_index: 10,
                ..State::default()
            }),
            writes: watch::Sender::new(10),
            sessions_changed: Notify::new(),
            stalled: watch::Sender::new(false),
        });
        let (shutdown, shutdown_requested) = oneshot::channel();
        let server_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("fake-consul".to_string())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the fake Consul");
                // Returning drops the runtime, which cancels every connection.
                runtime.block_on(serve(listener, server_shared, shutdown_requested));
            })
            .expect("start the fake Consul thread");
        FakeConsul {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes every request hang (or lets them go on).
    pub fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.send_replace(stalled);
    }

    /// How many sessions exist.
    pub fn session_count(&self) -> usize {
        self.shared.lock().sessions.len()
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock left consistent data: every
        // change is made in one step under it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Accepts connections until shutdown; sessions expire meanwhile.
async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
    tokio::spawn(expire_sessions(Arc::clone(&shared)));
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors or similar: let the moment pass.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        handle(Arc::clone(&shared), request)
                    });
                    // A client that goes away mid-request is not an error here.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

/// Invalidates sessions whose TTL ran out, sleeping until the next deadline.
async fn expire_sessions(shared: Arc<Shared>) {
    loop {
        let (next, written) = {
            let mut state = shared.lock();
            let now = Instant::now();
            let expired: Vec<String> = state
                .sessions
                .iter()
                .filter(|(_, session)| session.expires.is_some_and(|at| at <= now))
                .map(|(id, _)| id.clone())
                .collect();
            let any_expired = !expired.is_empty();
            for id in expired {
                invalidate(&mut state, &id);
            }
            let next = state.sessions.values().filter_map(|s| s.expires).min();
            (next, any_expired.then_some(state.index))
        };
        if let Some(index) = written {
            shared.writes.send_replace(index);
        }
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = shared.sessions_changed.notified() => {}
                }
            }
            None => shared.sessions_changed.notified().await,
        }
    }
}

/// Removes a session: its keys are deleted or released and put under its
/// lock-delay, in one Raft write.
fn invalidate(state: &mut State, id: &str) {
    let Some(session) = state.sessions.remove(id) else {
        return;
    };
    state.index += 1;
    let index = state.index;
    let held: Vec<String> = state
        .kv
        .iter()
        .filter(|(_, entry)| entry.session.as_deref() == Some(id))
        .map(|(key, _)| key.clone())
        .collect();
    let now = Instant::now();
    for key in held {
        if !session.lock_delay.is_zero() {
            state
                .lock_delays
                .insert(key.clone(), now + session.lock_delay);
        }
        match session.behavior {
            Behavior::Delete => {
                state.kv.remove(&key);
            }
            Behavior::Release => {
                if let Some(entry) = state.kv.get_mut(&key) {
                    entry.session = None;
                    entry.modify_index = index;
                }
            }
        }
        state.key_changed.insert(key, index);
        state.kv_index = index;
    }
}

type Answer = Response<Full<Bytes>>;

/// Serves one request.
async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Answer, Infallible> {
    let mut stalled = shared.stalled.subscribe();
    // The sender lives in `shared`, so this only returns once unstalled.
    let _ = stalled.wait_for(|stalled| !*stalled).await;
    if let Some(token) = &shared.options.token {
        let given = request
            .headers()
            .get("X-Consul-Token")
            .and_then(|value| value.to_str().ok());
        if given != Some(token.as_str()) {
            return Ok(text(StatusCode::FORBIDDEN, "ACL not found"));
        }
    }
    let method = request.method().clone();
    let path = match percent_decode(request.uri().path()) {
        Some(path) => path,
        None => return Ok(text(StatusCode::BAD_REQUEST, "bad percent escape in path")),
    };
    let query = parse_query(request.uri().query().unwrap_or(""));
    let body = match Limited::new(request.into_body(), MAX_VALUE).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return Ok(text(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Request body too large",
            ));
        }
    };
    let answer = if let Some(key) = path.strip_prefix("/v1/kv/") {
        match method {
            Method::GET => kv_get(&shared, key, &query).await,
            Method::PUT => kv_put(&shared, key, &query, &body),
            Method::DELETE => kv_delete(&shared, key, &query),
            _ => method_not_allowed(&method),
        }
    } else if let Some(action) = path.strip_prefix("/v1/session/") {
        let (action, id) = action.split_once('/').unwrap_or((action, ""));
        match (&method, action) {
            (&Method::PUT, "create") => session_create(&shared, &body),
            (&Method::PUT, "renew") => session_renew(&shared, id),
            (&Method::PUT, "destroy") => session_destroy(&shared, id),
            (&Method::GET, "info") => session_info(&shared, id),
            (_, "create" | "renew" | "destroy" | "info") => method_not_allowed(&method),
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    } else {
        text(StatusCode::NOT_FOUND, "not found")
    };
    Ok(answer)
}

fn text(status: StatusCode, message: &str) -> Answer {
    let mut answer = Response::new(Full::new(Bytes::from(message.to_string())));
    *answer.status_mut() = status;
    answer
}

fn method_not_allowed(method: &Method) -> Answer {
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} not allowed"),
    )
}

/// A JSON answer with Consul's index headers.
fn json(status: StatusCode, value: &serde_json::Value, index: u64) -> Answer {
    let mut answer = with_index(text(status, &value.to_string()), index);
    answer.headers_mut().insert(
        "Content-Type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    answer
}

fn with_index(mut answer: Answer, index: u64) -> Answer {
    let headers = answer.headers_mut();
    headers.insert("X-Consul-Index", index.into());
    headers.insert(
        "X-Consul-KnownLeader",
        hyper::header::HeaderValue::from_static("true"),
    );
    headers.insert(
        "X-Consul-LastContact",
        hyper::header::HeaderValue::from(0u64),
    );
    answer
}

/// `GET /v1/kv/<key>`, blocking when `?index` is given.
async fn kv_get(shared: &Shared, key: &str, query: &HashMap<String, String>) -> Answer {
    let since = match query.get("index").map(|index| index.parse::<u64>()) {
        None => None,
        Some(Ok(index)) => Some(index),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid index"),
    };
    let wait = match query.get("wait").map(|wait| parse_go_duration(wait)) {
        None => DEFAULT_WAIT,
        Some(Some(wait)) if wait.is_zero() => DEFAULT_WAIT,
        Some(Some(wait)) => wait.min(MAX_WAIT),
        Some(None) => return text(StatusCode::BAD_REQUEST, "Invalid wait time"),
    };
    let deadline = Instant::now() + wait;
    let mut writes = shared.writes.subscribe();
    loop {
        writes.borrow_and_update();
        let (answer, index, changed) = {
            let state = shared.lock();
            let changed = state.key_changed.get(key).copied().unwrap_or(0);
            let (answer, index) = match state.kv.get(key) {
                Some(entry) => (
                    json(
                        StatusCode::OK,
                        &serde_json::json!([entry_json(key, entry)]),
                        entry.modify_index,
                    ),
                    entry.modify_index,
                ),
                None => (
                    with_index(text(StatusCode::NOT_FOUND, ""), state.kv_index),
                    state.kv_index,
                ),
            };
            (answer, index, changed)
        };
        let Some(since) = since else { return answer };
        if index > since || Instant::now() >= deadline {
            return answer;
        }
        // Block until this key changes or the wait is over.
        loop {
            match tokio::time::timeout_at(deadline, writes.changed()).await {
                Ok(Ok(())) => {
                    let now_changed = shared.lock().key_changed.get(key).copied().unwrap_or(0);
                    if now_changed != changed {
                        break;
                    }
                }
                Ok(Err(_)) | Err(_) => return answer,
            }
        }
    }
}

fn entry_json(key: &str, entry: &Entry) -> serde_json::Value {
    let mut json = serde_json::json!({
        "LockIndex": entry.lock_index,
        "Key": key,
        "Flags": entry.flags,
        "Value": if entry.value.is_empty() {
            serde_json::Value::Null
        } else {
            base64::engine::general_purpose::STANDARD.encode(&entry.value).into()
        },
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    });
    if let Some(session) = &entry.session {
        json["Session"] = session.clone().into();
    }
    json
}

/// `PUT /v1/kv/<key>` with `?acquire`, `?release`, `?cas` or none.
fn kv_put(shared: &Shared, key: &str, query: &HashMap<String, String>, body: &[u8]) -> Answer {
    let flags = match query.get("flags").map(|flags| flags.parse::<u64>()) {
        None => 0,
        Some(Ok(flags)) => flags,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid flags"),
    };
    let cas = match query.get("cas").map(|cas| cas.parse::<u64>()) {
        None => None,
        Some(Ok(cas)) => Some(cas),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "Invalid cas index"),
    };
    let mut state = shared.lock();
    let now = Instant::now();
    let done = if let Some(session) = query.get("acquire") {
        if !state.sessions.contains_key(session) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("invalid session {session:?}"),
            );
        }
        if state.lock_delays.get(key).is_some_and(|until| *until > now) {
            false
        } else {
            match state.kv.get(key).map(|entry| entry.session.clone()) {
                Some(Some(holder)) if holder != *session => false,
                // The holder re-acquiring: the value changes, not the lock index.
                Some(Some(_)) => write(&mut state, key, body, flags, None, false),
                _ => write(&mut state, key, body, flags, Some(session.clone()), true),
            }
        }
    } else if let Some(session) = query.get("release") {
        let holds = state
            .kv
            .get(key)
            .is_some_and(|entry| entry.session.as_deref() == Some(session.as_str()));
        holds && {
            write(&mut state, key, body, flags, None, false);
            if let Some(entry) = state.kv.get_mut(key) {
                entry.session = None;
            }
            true
        }
    } else {
        let allowed = match (cas, state.kv.get(key)) {
            (None, _) | (Some(0), None) => true,
            (Some(cas), Some(entry)) => cas != 0 && entry.modify_index == cas,
            (Some(_), None) => false,
        };
        allowed && write(&mut state, key, body, flags, None, false)
    };
    let index = state.index;
    drop(state);
    shared.writes.send_replace(index);
    json(StatusCode::OK, &done.into(), index)
}

/// Writes `value` under `key` at a new index, creating the entry if needed; with
/// `lock`, the entry becomes held by that session with the next lock index.
fn write(
    state: &mut State,
    key: &str,
    value: &[u8],
    flags: u64,
    lock: Option<String>,
    new_lock: bool,
) -> bool {
    state.index += 1;
    let index = state.index;
    let entry = state.kv.entry(key.to_string()).or_insert(Entry {
        value: Vec::new(),
        flags: 0,
        create_index: index,
        modify_index: index,
        lock_index: 0,
        session: None,
    });
    entry.value = value.to_vec();
    entry.flags = flags;
    entry.modify_index = index;
    if new_lock {
        entry.lock_index += 1;
        entry.session = lock;
    }
    state.key_changed.insert(key.to_string(), index);
    state.kv_index = index;
    true
}

/// `DELETE /v1/kv/<key>`, with `?recurse` or `?cas`.
fn kv_delete(shared: &Shared, key: &str, query: &HashMap<String, String>) -> Answer {
    let mut state = shared.lock();
    let keys: Vec<String> = if query.contains_key("recurse") {
        state
            .kv
            .keys()
            .filter(|candidate| candidate.starts_with(key))
            .cloned()
            .collect()
    } else {
        match (
            query.get("cas").map(|cas| cas.parse::<u64>()),
            state.kv.get(key),
        ) {
            (Some(Err(_)), _) => return text(StatusCode::BAD_REQUEST, "Invalid cas index"),
            (Some(Ok(cas)), Some(entry)) if entry.modify_index != cas => {
                let index = state.index;
                return json(StatusCode::OK, &false.into(), index);
            }
            _ => vec![key.to_string()],
        }
    };
    state.index += 1;
    let index = state.index;
    for key in keys {
        if state.kv.remove(&key).is_some() {
            state.key_changed.insert(key, index);
        }
    }
    state.kv_index = index;
    drop(state);
    shared.writes.send_replace(index);
    json(StatusCode::OK, &true.into(), index)
}

/// `PUT /v1/session/create`.
fn session_create(shared: &Shared, body: &[u8]) -> Answer {
    let fields = if body.is_empty() {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(serde_json::Value::Object(fields)) => fields,
            _ => return text(StatusCode::BAD_REQUEST, "Request decode failed"),
        }
    };
    let mut name = String::new();
    let mut ttl = None;
    let mut lock_delay = DEFAULT_LOCK_DELAY;
    let mut behavior = Behavior::Release;
    let mut node_checks = vec!["serfHealth".to_string()];
    for (field, value) in &fields {
        let bad = |what: &str| {
            text(
                StatusCode::BAD_REQUEST,
                &format!("Request decode failed: {field}: {what}"),
            )
        };
        match field.as_str() {
            "Name" => match value.as_str() {
                Some(text) => name = text.to_string(),
                None => return bad("expected a string"),
            },
            "TTL" => match value.as_str().map(parse_go_duration) {
                Some(Some(duration)) if duration.is_zero() => ttl = None,
                Some(Some(duration)) => ttl = Some(duration),
                _ => return bad("expected a duration string"),
            },
            "LockDelay" => {
                let duration = match value {
                    serde_json::Value::String(text) => parse_go_duration(text),
                    serde_json::Value::Number(number) => number.as_u64().map(Duration::from_nanos),
                    _ => None,
                };
                // Consul reads small numbers as seconds.
                lock_delay = match duration {
                    Some(duration) if duration < Duration::from_nanos(1000) => {
                        Duration::from_secs(duration.as_nanos() as u64)
                    }
                    Some(duration) => duration,
                    None => return bad("expected a duration"),
                };
            }
            "Behavior" => match value.as_str() {
                Some("release") | Some("") => behavior = Behavior::Release,
                Some("delete") => behavior = Behavior::Delete,
                _ => return bad("expected \"release\" or \"delete\""),
            },
            "NodeChecks" | "Checks" | "ServiceChecks" => match value.as_array() {
                Some(checks) => {
                    if field == "NodeChecks" || field == "Checks" {
                        node_checks = checks
                            .iter()
                            .filter_map(|check| check.as_str().map(str::to_string))
                            .collect();
                    }
                }
                None => return bad("expected a list"),
            },
            "Node" => {}
            _ => return bad("unknown field"),
        }
    }
    let min = shared.options.session_ttl_min;
    if let Some(ttl) = ttl.filter(|ttl| *ttl < min || *ttl > MAX_TTL) {
        return text(
            StatusCode::BAD_REQUEST,
            &format!(
                "Invalid Session TTL '{}', must be between [{:?}={:?}]",
                ttl.as_nanos(),
                shared.options.session_ttl_min,
                MAX_TTL
            ),
        );
    }
    let mut state = shared.lock();
    state.index += 1;
    state.sessions_created += 1;
    let index = state.index;
    let id = format!(
        "{:08x}-0000-4000-8000-{:012x}",
        std::process::id(),
        state.sessions_created
    );
    let expires = ttl.map(|ttl| Instant::now() + ttl.mul_f64(shared.options.expiry_factor));
    state.sessions.insert(
        id.clone(),
        Session {
            name,
            ttl,
            lock_delay,
            behavior,
            node_checks,
            create_index: index,
            expires,
        },
    );
    drop(state);
    shared.sessions_changed.notify_one();
    shared.writes.send_replace(index);
    json(StatusCode::OK, &serde_json::json!({ "ID": id }), index)
}

fn session_json(id: &str, session: &Session) -> serde_json::Value {
    serde_json::json!({
        "ID": id,
        "Name": session.name,
        "Node": "fake-consul",
        "LockDelay": session.lock_delay.as_nanos() as u64,
        "Behavior": match session.behavior {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        },
        "TTL": session.ttl.map_or(String::new(), |ttl| format!("{}ms", ttl.as_millis())),
        "NodeChecks": session.node_checks,
        "ServiceChecks": null,
        "CreateIndex": session.create_index,
        "ModifyIndex": session.create_index,
    })
}

/// `PUT /v1/session/renew/<id>`.
fn session_renew(shared: &Shared, id: &str) -> Answer {
    let mut state = shared.lock();
    let index = state.index;
    let factor = shared.options.expiry_factor;
    match state.sessions.get_mut(id) {
        Some(session) => {
            session.expires = session.ttl.map(|ttl| Instant::now() + ttl.mul_f64(factor));
            json(
                StatusCode::OK,
                &serde_json::json!([session_json(id, session)]),
                index,
            )
        }
        None => text(
            StatusCode::NOT_FOUND,
            &format!("Session id '{id}' not found"),
        ),
    }
}

/// `PUT /v1/session/destroy/<id>`: `true` even for an unknown session.
fn session_destroy(shared: &Shared, id: &str) -> Answer {
    let mut state = shared.lock();
    invalidate(&mut state, id);
    let index = state.index;
    drop(state);
    shared.writes.send_replace(index);
    json(StatusCode::OK, &true.into(), index)
}

/// `GET /v1/session/info/<id>`: a list of zero or one session.
fn session_info(shared: &Shared, id: &str) -> Answer {
    let state = shared.lock();
    let sessions: Vec<serde_json::Value> = state
        .sessions
        .get(id)
        .map(|session| session_json(id, session))
        .into_iter()
        .collect();
    json(StatusCode::OK, &sessions.into(), state.index)
}

/// Parses `a=b&c` into a map (`c` maps to the empty string), percent-decoded.
fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(name)?, percent_decode(value)?))
        })
        .collect()
}

/// Decodes `%XX` escapes; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = std::str::from_utf8(bytes.get(at + 1..at + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            decoded.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// Parses a Go duration made of whole numbers with units (`1m30s`, `1500ms`,
/// `0`); `None` when it is not one.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_end] {
            "ns" => Duration::from_nanos(1),
            "us" | "µs" => Duration::from_micros(1),
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        total += unit.checked_mul(u32::try_from(number).ok()?)?;
        rest = &rest[unit_end..];
    }
    Some(total)
}
