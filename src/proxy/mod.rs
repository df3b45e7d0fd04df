//! The write-forwarding HTTP proxy in front of the application (`proxy.*`).
//!
//! Every request to `proxy.addr` is answered here or by the application at
//! `proxy.target`:
//!
//! - `GET /ltxfs/health`: 200 on the primary, and on a replica connected to a
//!   primary (so it heard from it within the replication silence timeout) whose
//!   lag is within `proxy.max-lag` (when set); otherwise 503 with the reason.
//! - Paths matching `proxy.passthrough` go straight to the application.
//! - Reads (GET and HEAD, except paths matching `proxy.always-forward`) are served
//!   by the local application. A read carrying the `__txid` cookie waits, on a
//!   replica, until every tracked database (`proxy.db`) has reached the position
//!   in the cookie (read-your-writes), at most `proxy.primary-redirect-timeout`;
//!   then 504.
//! - Writes (every other request) go to the local application on the primary,
//!   and their answer sets the `__txid` cookie to the tracked databases'
//!   positions after the write. On a replica, in `replay` mode the answer is an
//!   empty response with `fly-replay: instance=<primary>` (Fly.io's edge replays
//!   the request there); in `forward` mode the request is forwarded to the
//!   primary's proxy (its URL comes with the primary's `Hello`) and its answer
//!   returned. While no primary is known — during a handoff — writes wait, at
//!   most `proxy.primary-redirect-timeout`; then 503.
//!
//! The `__txid` cookie holds, for each database of `proxy.db` in order, its TXID
//! as 16 hex digits, joined by `-` (with one database it is LiteFS's cookie).
//!
//! Invariants: a write reaches the local application only while this node is the
//! primary and the [`WriteGate`] is open, and holds its pass until the
//! application's answer arrives, so a handoff waits for it; hop-by-hop headers
//! are never passed on, except the upgrade headers of a WebSocket (or other
//! upgrade) request, whose two connections are then joined; bodies stream
//! through without being buffered; a forwarded request carries how many proxies
//! forwarded it, and is refused after [`MAX_FORWARDS`], so proxies never loop.

pub mod gate;
mod headers;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, SET_COOKIE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bridge::CommitBridge;
use crate::config::{ProxyConfig, ProxyMode};
use crate::error_chain::error_chain;
use crate::http_pool::{PooledClient, Schemes, pooled_client};
use crate::store::{Role, Store};

pub use gate::{WriteGate, WritePass};

/// The path of the health check.
pub const HEALTH_PATH: &str = "/ltxfs/health";
/// The read-your-writes cookie (LiteFS's name).
pub const TXID_COOKIE: &str = "__txid";
/// How long the `__txid` cookie lives.
const COOKIE_MAX_AGE: Duration = Duration::from_secs(300);
/// The header a forwarding proxy adds: how many proxies forwarded the request.
pub const FORWARDED_HEADER: &str = "ltxfs-forwarded";
/// How many times a write may be forwarded (the primary can move while it
/// travels).
pub const MAX_FORWARDS: u32 = 3;
/// The pause after a failed accept (for example, out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// What the proxy does, from `proxy.*`.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The application's `host:port`.
    pub target: String,
    /// The databases whose positions the `__txid` cookie carries.
    pub databases: Vec<String>,
    /// Path globs sent straight to the application.
    pub passthrough: Vec<String>,
    /// Path globs of reads that are treated as writes.
    pub always_forward: Vec<String>,
    /// The largest lag at which a replica is healthy; `None` for no bound.
    pub max_lag: Option<Duration>,
    /// How long a write waits for a primary, and a read for its position.
    pub redirect_timeout: Duration,
    /// How writes on a replica reach the primary.
    pub mode: ProxyMode,
    /// Log every request.
    pub debug: bool,
}

impl ProxySettings {
    /// Forwarding writes to the primary's proxy, tracking `databases`, with every
    /// other setting at its `proxy.*` default.
    pub fn forwarding(target: String, databases: Vec<String>) -> ProxySettings {
        ProxySettings {
            target,
            databases,
            passthrough: Vec::new(),
            always_forward: Vec::new(),
            max_lag: None,
            redirect_timeout: ProxyConfig::default().primary_redirect_timeout,
            mode: ProxyMode::Forward,
            debug: false,
        }
    }
}

/// What the proxy needs from the node.
#[derive(Debug, Clone)]
pub struct ProxyNode {
    /// The node's databases, role and primary.
    pub store: Arc<Store>,
    /// Wakes the proxy when a database commits or the role or primary changes;
    /// must be the store's commit listener.
    pub commits: Arc<CommitBridge>,
    /// Shared with the role loop's handoff.
    pub writes: Arc<WriteGate>,
}

/// Why the proxy stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listener failed for good.
    #[error("the proxy cannot accept connections")]
    Accept(#[source] std::io::Error),
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

struct Proxy {
    settings: ProxySettings,
    node: ProxyNode,
    client: PooledClient<Incoming>,
}

/// Serves the proxy on `listener` until `shutdown` is cancelled; connections
/// then finish the request they are answering.
pub async fn serve(
    listener: TcpListener,
    settings: ProxySettings,
    node: ProxyNode,
    shutdown: CancellationToken,
) -> Result<(), ProxyError> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, target = %settings.target, mode = ?settings.mode, "serving the proxy");
    }
    let proxy = Arc::new(Proxy {
        settings,
        node,
        client: pooled_client(Schemes::Http, None),
    });
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) if is_transient(&error) => {
                    tracing::warn!(%error, "the proxy could not accept a connection; retrying");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
                Err(error) => return Err(ProxyError::Accept(error)),
            },
            () = shutdown.cancelled() => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(request, peer).await) }
            });
            let connection = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut connection = std::pin::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "proxy connection ended with an error");
            }
        });
    }
}

/// Whether an accept error passes (resource exhaustion, an aborted connection).
fn is_transient(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

impl Proxy {
    async fn handle(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let response = if path == HEALTH_PATH {
            self.health()
        } else if matches_any(&self.settings.passthrough, &path) {
            self.send(request, &self.app_url(), peer, None).await
        } else if is_write(&method) || matches_any(&self.settings.always_forward, &path) {
            self.write(request, peer).await
        } else {
            self.read(request, peer).await
        };
        if self.settings.debug {
            tracing::info!(%peer, %method, path, status = response.status().as_u16(), "proxied");
        }
        response
    }

    fn app_url(&self) -> String {
        format!("http://{}", self.settings.target)
    }

    /// The health check (see the module docs).
    fn health(&self) -> Response<ProxyBody> {
        let cluster = self.node.store.cluster();
        if cluster.role() == Role::Primary {
            return text(StatusCode::OK, "primary".to_string());
        }
        let unhealthy = |reason: String| text(StatusCode::SERVICE_UNAVAILABLE, reason);
        let Some(primary) = cluster.primary() else {
            return unhealthy("replica, not connected to a primary".to_string());
        };
        match cluster.lag() {
            None => unhealthy("replica, not heard from the primary yet".to_string()),
            Some(lag) if self.settings.max_lag.is_some_and(|max| lag > max) => unhealthy(format!(
                "replica, lag {} ms exceeds proxy.max-lag {:?}",
                lag.as_millis(),
                self.settings.max_lag.unwrap_or_default()
            )),
            Some(lag) => text(
                StatusCode::OK,
                format!("replica of {primary}, lag {} ms", lag.as_millis()),
            ),
        }
    }

    /// A read: waits for the cookie's positions on a replica, then the local
    /// application answers.
    async fn read(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        if self.node.store.cluster().role() == Role::Replica {
            if let Some(wanted) = self.cookie_positions(&request) {
                if !self.wait_for_positions(&wanted).await {
                    return text(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "this replica did not reach the position of your last write within {:?}",
                            self.settings.redirect_timeout
                        ),
                    );
                }
            }
        }
        self.send(request, &self.app_url(), peer, None).await
    }

    /// A write: to the local application on the primary, else to the primary;
    /// waits while no primary is known.
    async fn write(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let forwards = forward_count(&request);
        let deadline = Instant::now() + self.settings.redirect_timeout;
        let mut changes = self.node.commits.subscribe();
        loop {
            changes.mark_seen();
            let cluster = self.node.store.cluster();
            match cluster.role() {
                Role::Primary => {
                    if let Some(pass) = self.node.writes.try_enter() {
                        let mut response = self.send(request, &self.app_url(), peer, None).await;
                        let cookie = self.position_cookie();
                        drop(pass);
                        if let Ok(value) = HeaderValue::from_str(&cookie) {
                            response.headers_mut().append(SET_COOKIE, value);
                        }
                        return response;
                    }
                }
                Role::Replica => {
                    if let Some(primary) = cluster.primary() {
                        return match (self.settings.mode, cluster.primary_proxy_url()) {
                            (ProxyMode::Replay, _) => replay(&primary),
                            (ProxyMode::Forward, _) if forwards >= MAX_FORWARDS => text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!(
                                    "the write was forwarded {forwards} times without reaching the primary; try again"
                                ),
                            ),
                            (ProxyMode::Forward, Some(url)) => {
                                self.send(request, &url, peer, Some(forwards + 1)).await
                            }
                            (ProxyMode::Forward, None) => text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!(
                                    "the primary {primary} runs no proxy to forward this write to"
                                ),
                            ),
                        };
                    }
                }
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no primary took this write within {:?}; try again",
                        self.settings.redirect_timeout
                    ),
                );
            }
        }
    }

    /// Sends `request` to `base_url` (the application, or the primary's proxy
    /// when `forwards` is given) and returns its answer, joining the two
    /// connections when it upgrades.
    async fn send(
        &self,
        mut request: Request<Incoming>,
        base_url: &str,
        peer: SocketAddr,
        forwards: Option<u32>,
    ) -> Response<ProxyBody> {
        let upgrade = headers::upgrade_requested(request.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut request));
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |path| path.as_str());
        let uri: Uri = match format!("{base_url}{path}").parse() {
            Ok(uri) => uri,
            Err(error) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("bad upstream URL: {error}"),
                );
            }
        };
        *request.uri_mut() = uri;
        headers::prepare_request(request.headers_mut(), peer, upgrade, forwards);
        let mut response = match self.client.request(request).await {
            Ok(response) => response,
            Err(error) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("{base_url} did not answer: {}", error_chain(&error)),
                );
            }
        };
        let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some(client_side)) = (upgraded, client_side) {
            let upstream_side = hyper::upgrade::on(&mut response);
            tokio::spawn(headers::join_upgraded(client_side, upstream_side));
        }
        headers::prepare_response(response.headers_mut(), upgraded);
        response.map(BodyExt::boxed)
    }

    /// The `__txid` cookie after a write: the tracked databases' positions.
    fn position_cookie(&self) -> String {
        let txids: Vec<String> = self
            .settings
            .databases
            .iter()
            .map(|name| format!("{:016x}", self.local_txid(name)))
            .collect();
        format!(
            "{TXID_COOKIE}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
            txids.join("-"),
            COOKIE_MAX_AGE.as_secs()
        )
    }

    fn local_txid(&self, name: &str) -> u64 {
        self.node
            .store
            .database(name)
            .map_or(0, |database| database.position().txid.0)
    }

    /// The positions in the request's `__txid` cookie, one per tracked database;
    /// `None` without a cookie or with one that does not fit.
    fn cookie_positions(&self, request: &Request<Incoming>) -> Option<Vec<u64>> {
        let value = headers::cookie(request.headers(), TXID_COOKIE)?;
        let txids: Option<Vec<u64>> = value
            .split('-')
            .map(|txid| u64::from_str_radix(txid, 16).ok())
            .collect();
        txids.filter(|txids| txids.len() == self.settings.databases.len())
    }

    /// Waits until every tracked database is at least at `wanted`; `false` when
    /// the redirect timeout passed first.
    async fn wait_for_positions(&self, wanted: &[u64]) -> bool {
        let deadline = Instant::now() + self.settings.redirect_timeout;
        let mut changes = self.node.commits.subscribe();
        loop {
            changes.mark_seen();
            let reached = self
                .settings
                .databases
                .iter()
                .zip(wanted)
                .all(|(name, wanted)| self.local_txid(name) >= *wanted);
            if reached {
                return true;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }
}

/// Whether `method` changes data: everything but GET and HEAD.
fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
}

/// How many proxies forwarded `request` already.
fn forward_count(request: &Request<Incoming>) -> u32 {
    request
        .headers()
        .get(FORWARDED_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

/// Whether `path` matches one of `globs`, where `*` matches any run of
/// characters (LiteFS's rule).
fn matches_any(globs: &[String], path: &str) -> bool {
    globs.iter().any(|glob| glob_matches(glob, path))
}

fn glob_matches(glob: &str, text: &str) -> bool {
    let mut parts = glob.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// The answer that makes Fly.io's edge replay the request on the primary.
fn replay(primary: &str) -> Response<ProxyBody> {
    let mut response = Response::new(empty());
    if let Ok(value) = HeaderValue::from_str(&format!("instance={primary}")) {
        response.headers_mut().insert("fly-replay", value);
    }
    response
}

fn text(status: StatusCode, message: String) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(format!("{message}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn empty() -> ProxyBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::http::HttpClient;
    use crate::store::CaptureOptions;
    use crate::store::cluster::unix_now_ms;

    /// A proxy on a replica store (in `dir`) in front of an app that must never
    /// be reached; returns the store and the proxy's URL.
    async fn replica_proxy(
        dir: &std::path::Path,
        max_lag: Option<Duration>,
        shutdown: &CancellationToken,
    ) -> (Arc<Store>, String, tokio::net::TcpSocket) {
        let store = Arc::new(Store::open(dir, CaptureOptions::default(), Role::Replica).unwrap());
        let commits = Arc::new(CommitBridge::new());
        store.set_commit_listener(commits.clone());
        // A port bound but not listening, held by the caller so that no other
        // socket (the proxy's own among them) gets it: reaching the app is a 502.
        let closed = tokio::net::TcpSocket::new_v4().unwrap();
        closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let target = closed.local_addr().unwrap().to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let settings = ProxySettings {
            always_forward: vec!["/logout".into()],
            max_lag,
            redirect_timeout: Duration::from_millis(200),
            ..ProxySettings::forwarding(target, vec!["app.db".into()])
        };
        let node = ProxyNode {
            store: store.clone(),
            commits,
            writes: Arc::new(WriteGate::new()),
        };
        tokio::spawn(serve(listener, settings, node, shutdown.clone()));
        (store, url, closed)
    }

    async fn call(method: Method, url: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let response = HttpClient::new()
            .request(method, url, headers, Bytes::new(), Duration::from_secs(5))
            .await
            .unwrap();
        (
            response.status.as_u16(),
            String::from_utf8_lossy(&response.body).into_owned(),
        )
    }

    #[tokio::test]
    async fn a_request_body_streams_through_to_the_app_as_it_is_sent() {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        use tokio::sync::{mpsc, oneshot};

        // The app counts the body's bytes and says when the first part arrived.
        let (first_seen, first_arrived) = oneshot::channel::<()>();
        let first_seen = Arc::new(std::sync::Mutex::new(Some(first_seen)));
        let app = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = app.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (stream, _) = app.accept().await.unwrap();
            let service = service_fn(move |request: Request<Incoming>| {
                let first_seen = first_seen.clone();
                async move {
                    let mut body = request.into_body();
                    let mut received = 0;
                    while let Some(frame) = body.frame().await {
                        if let Ok(data) = frame.unwrap().into_data() {
                            received += data.len();
                            if let Some(seen) = first_seen.lock().unwrap().take() {
                                let _ = seen.send(());
                            }
                        }
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(received.to_string()))))
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });

        // The proxy, on a primary: a POST goes to the local app.
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(Store::open(dir.path(), CaptureOptions::default(), Role::Primary).unwrap());
        let commits = Arc::new(CommitBridge::new());
        store.set_commit_listener(commits.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = listener.local_addr().unwrap();
        let settings = ProxySettings::forwarding(target, vec!["app.db".into()]);
        let node = ProxyNode {
            store,
            commits,
            writes: Arc::new(WriteGate::new()),
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, settings, node, shutdown.clone()));

        // A chunked upload whose second part is sent only once the app has the
        // first: a proxy that buffered the body would never let it finish.
        let (parts, parts_rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(parts_rx));
        let stream = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = Request::post("/upload").body(body).unwrap();
        let response = tokio::spawn(async move { sender.send_request(request).await });
        parts
            .send(Ok(Frame::data(Bytes::from(vec![1u8; 1000]))))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), first_arrived)
            .await
            .expect("the first part reached the app before the body ended")
            .unwrap();
        parts
            .send(Ok(Frame::data(Bytes::from(vec![2u8; 500]))))
            .await
            .unwrap();
        drop(parts);
        let response = response.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, "1500");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn without_a_primary_writes_wait_then_fail_with_503_and_health_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let (_store, url, _app_port) = replica_proxy(dir.path(), None, &shutdown).await;
        let started = std::time::Instant::now();
        let (status, text) = call(Method::POST, &format!("{url}/items"), &[]).await;
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("no primary took this write"), "{text}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        // A GET listed in always-forward is a write too.
        let (status, _) = call(Method::GET, &format!("{url}/logout"), &[]).await;
        assert_eq!(status, 503);
        let (status, text) = call(Method::GET, &format!("{url}{HEALTH_PATH}"), &[]).await;
        assert_eq!(
            (status, text.trim()),
            (503, "replica, not connected to a primary")
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn health_fails_past_max_lag_and_a_cookie_ahead_of_the_replica_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let max_lag = Duration::from_secs(2);
        let (store, url, _app_port) = replica_proxy(dir.path(), Some(max_lag), &shutdown).await;
        store.set_primary(Some("node-a".into()));
        // The primary was last heard from longer ago than max-lag.
        store
            .cluster()
            .note_primary_timestamp(unix_now_ms() - 5_000);
        let (status, text) = call(Method::GET, &format!("{url}{HEALTH_PATH}"), &[]).await;
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("exceeds proxy.max-lag"), "{text}");
        store.cluster().note_primary_timestamp(unix_now_ms());
        let (status, text) = call(Method::GET, &format!("{url}{HEALTH_PATH}"), &[]).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.starts_with("replica of node-a, lag"), "{text}");
        // A cookie naming a TXID this replica never reaches: 504, never the app.
        let cookie = format!("{TXID_COOKIE}={:016x}", 7);
        let (status, text) =
            call(Method::GET, &format!("{url}/items"), &[("cookie", &cookie)]).await;
        assert_eq!(status, 504, "{text}");
        // A malformed cookie is ignored: the read goes to the app (closed: 502).
        let (status, _) = call(
            Method::GET,
            &format!("{url}/items"),
            &[("cookie", "__txid=zz")],
        )
        .await;
        assert_eq!(status, 502);
        shutdown.cancel();
    }

    #[test]
    fn globs_match_with_stars_only() {
        assert!(glob_matches("/assets/*", "/assets/app.css"));
        assert!(glob_matches("*.css", "/assets/app.css"));
        assert!(glob_matches("/a/*/c", "/a/b/c"));
        assert!(glob_matches("/exact", "/exact"));
        assert!(!glob_matches("/exact", "/exact/more"));
        assert!(!glob_matches("/a/*/c", "/a/b/d"));
        assert!(glob_matches("*", "/anything"));
        assert!(!glob_matches("/x*y*z", "/xzy"));
    }

    #[test]
    fn only_get_and_head_are_reads() {
        assert!(!is_write(&Method::GET));
        assert!(!is_write(&Method::HEAD));
        for method in [
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(is_write(&method), "{method}");
        }
    }

    #[test]
    fn a_replay_names_the_primary() {
        let response = replay("machine-1");
        assert_eq!(response.headers()["fly-replay"], "instance=machine-1");
        assert_eq!(response.status(), StatusCode::OK);
    }
}
