//! The cluster secret: every call of the node API proves that its caller knows
//! the secret, and every answer proves that the node answering knows it too.
//!
//! A call carries the header `ltxfs-auth: <unix ms>.<nonce>.<mac>`, where `mac` is
//! HMAC-SHA-256 under the caller's first secret over the method's path, the time,
//! a fresh 128-bit nonce and the SHA-256 of the request body. The server accepts it
//! when the MAC verifies under any of its secrets (so a rolling deploy can change
//! the secret: sign with the new one while both are accepted), the time is within
//! [`MAX_CLOCK_SKEW`] of its own clock, and the nonce was not seen within that
//! window (a replayed call is refused). Its answer carries `ltxfs-auth-reply`, an
//! HMAC under the same secret over the call's MAC, which the caller checks before
//! it reads a byte of the answer, so a node never follows an impostor primary.
//!
//! Invariants:
//! - MACs are compared in constant time (`Mac::verify_slice`).
//! - A refused call never reaches the service: no byte of any database is sent.
//! - The replay guard holds at most [`MAX_REMEMBERED_NONCES`] nonces, each only
//!   until its time is older than the skew window; only calls whose MAC verified
//!   are remembered, so only holders of the secret can fill it.
//!
//! The secret authenticates calls and answers; it neither encrypts them nor
//! protects the bytes of a stream after its headers from someone on the path:
//! that is what `http.tls` is for (docs/security.md).

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use sha2::{Digest, Sha256};
use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderValue};

use crate::config::Secret;
use crate::hex;
use crate::store::cluster::unix_now_ms;
use crate::sync::LockUnpoisoned;

type HmacSha256 = Hmac<Sha256>;

/// The header a call proves itself with.
pub const AUTH_HEADER: &str = "ltxfs-auth";
/// The header an answer proves itself with.
pub const AUTH_REPLY_HEADER: &str = "ltxfs-auth-reply";
/// How far a call's clock may be from the server's.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// The most nonces the replay guard remembers; a call that would need more is
/// refused until older ones expire.
pub const MAX_REMEMBERED_NONCES: usize = 1 << 20;
/// The largest request body a signed call may have (every request of the API is
/// one small message).
pub const MAX_SIGNED_BODY_BYTES: usize = 1 << 20;

const REQUEST_CONTEXT: &[u8] = b"ltxfs node API v1 request\0";
const REPLY_CONTEXT: &[u8] = b"ltxfs node API v1 reply\0";

/// The cluster's secrets: the first signs, every one is accepted.
#[derive(Clone, Default)]
pub struct ClusterKeys {
    keys: Arc<Vec<Secret>>,
    /// While the secret is turned on (or off) across a cluster: calls without
    /// a proof are accepted and answers without one trusted; a wrong proof is
    /// still refused.
    accept_unsigned: bool,
}

impl fmt::Debug for ClusterKeys {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "ClusterKeys({} secrets)", self.keys.len())
    }
}

impl ClusterKeys {
    /// Keys from `http.secrets` (first signs); empty means the API is open.
    pub fn new(secrets: Vec<Secret>) -> ClusterKeys {
        ClusterKeys {
            keys: Arc::new(secrets),
            accept_unsigned: false,
        }
    }

    /// With `accept`, also accepts calls and answers of nodes that have no
    /// secret yet (`http.accept-unsigned`).
    pub fn accepting_unsigned(mut self, accept: bool) -> ClusterKeys {
        self.accept_unsigned = accept;
        self
    }

    /// Whether calls are signed and checked at all.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    fn signing_key(&self) -> Option<&Secret> {
        self.keys.first()
    }

    /// The secret under which `mac` verifies `message`, if any.
    fn verifying_key(&self, message: &[&[u8]], mac: &[u8]) -> Option<&Secret> {
        self.keys
            .iter()
            .find(|key| hmac(key, message).verify_slice(mac).is_ok())
    }

    /// Whether `token` is the bearer token of `GET /metrics` (any secret).
    pub fn accepts_bearer(&self, token: &str) -> bool {
        // Compared as MACs of the token, so the comparison takes constant time.
        let presented = hmac(&Secret::new(token), &[b"metrics"])
            .finalize()
            .into_bytes();
        self.keys
            .iter()
            .any(|key| hmac(key, &[b"metrics"]).verify_slice(&presented).is_ok())
    }
}

fn hmac(key: &Secret, message: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key.expose().as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for part in message {
        mac.update(part);
    }
    mac
}

/// What a call signs: the path, the time, the nonce and the body's digest.
fn request_message<'a>(
    path: &'a str,
    time: &'a [u8; 8],
    nonce: &'a [u8; 16],
    body_digest: &'a [u8],
) -> [&'a [u8]; 6] {
    [
        REQUEST_CONTEXT,
        path.as_bytes(),
        b"\0",
        time,
        nonce,
        body_digest,
    ]
}

/// The header value that signs a call of `path` with `body`.
pub(super) fn sign_request(
    key: &Secret,
    path: &str,
    now_ms: u64,
    nonce: [u8; 16],
    body: &[u8],
) -> String {
    let digest = Sha256::digest(body);
    let time = now_ms.to_be_bytes();
    let mac = hmac(key, &request_message(path, &time, &nonce, &digest)).finalize();
    format!(
        "{now_ms}.{}.{}",
        hex::encode(&nonce),
        hex::encode(&mac.into_bytes())
    )
}

/// The reply header's MAC over the call's MAC.
fn reply_mac(key: &Secret, request_mac: &[u8]) -> Vec<u8> {
    hmac(key, &[REPLY_CONTEXT, request_mac])
        .finalize()
        .into_bytes()
        .to_vec()
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// The call carries no proof; its caller has no secret set.
    #[error(
        "it carries no {AUTH_HEADER} header: the caller has no cluster secret set (http.secret)"
    )]
    Missing,
    /// The header is not `<ms>.<nonce>.<mac>`.
    #[error("its {AUTH_HEADER} header is malformed")]
    Malformed,
    /// The MAC verifies under none of this node's secrets.
    #[error("it is signed with another cluster secret than this node's (http.secret)")]
    WrongSecret,
    /// The call's time is too far from this node's clock.
    #[error(
        "its clock is {skew_ms} ms from this node's (at most {} s allowed): a replayed call, or clocks out of step",
        MAX_CLOCK_SKEW.as_secs()
    )]
    Stale {
        /// How far apart the clocks are.
        skew_ms: u64,
    },
    /// The nonce was already used: a replayed call.
    #[error("it repeats an earlier call (a replay)")]
    Replayed,
    /// The replay guard is full.
    #[error("this node is remembering too many recent calls; retry shortly")]
    TooManyCalls,
    /// The answer of a node does not prove it knows the secret.
    #[error(
        "its answer does not prove it knows the cluster secret (http.secret): another cluster's node, or an impostor"
    )]
    UnprovenAnswer,
}

/// Remembers recent nonces so that a call cannot be replayed.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    state: Mutex<ReplayState>,
}

#[derive(Debug, Default)]
struct ReplayState {
    seen: HashSet<[u8; 16]>,
    /// Nonces by the time after which they may be forgotten, oldest first.
    expiries: VecDeque<(u64, [u8; 16])>,
}

impl ReplayGuard {
    /// Records `nonce` of a call made at `time_ms`; fails when it was seen before.
    fn admit(&self, nonce: [u8; 16], time_ms: u64, now_ms: u64) -> Result<(), AuthFailure> {
        let mut state = self.state.lock_unpoisoned();
        while let Some(&(expiry, old)) = state.expiries.front() {
            if expiry > now_ms {
                break;
            }
            state.expiries.pop_front();
            state.seen.remove(&old);
        }
        if state.seen.contains(&nonce) {
            return Err(AuthFailure::Replayed);
        }
        if state.seen.len() >= MAX_REMEMBERED_NONCES {
            return Err(AuthFailure::TooManyCalls);
        }
        state.seen.insert(nonce);
        // Calls arrive roughly in time order, so the queue stays nearly sorted; a
        // nonce kept a little longer than needed is harmless.
        // Kept until the call's time is too old to pass the skew check.
        let expiry = time_ms.saturating_add(MAX_CLOCK_SKEW.as_millis() as u64 + 1);
        state.expiries.push_back((expiry, nonce));
        Ok(())
    }
}

/// Checks a call's header against `keys`; on success returns the reply header.
pub fn verify_request(
    keys: &ClusterKeys,
    guard: &ReplayGuard,
    header: Option<&HeaderValue>,
    path: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<HeaderValue, AuthFailure> {
    let header = header.ok_or(AuthFailure::Missing)?;
    let text = header.to_str().map_err(|_| AuthFailure::Malformed)?;
    let mut parts = text.split('.');
    let (Some(time), Some(nonce), Some(mac), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthFailure::Malformed);
    };
    let time_ms: u64 = time.parse().map_err(|_| AuthFailure::Malformed)?;
    let nonce: [u8; 16] = hex::decode(nonce)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(AuthFailure::Malformed)?;
    let mac = hex::decode(mac)
        .filter(|mac| mac.len() == 32)
        .ok_or(AuthFailure::Malformed)?;
    let digest = Sha256::digest(body);
    let time = time_ms.to_be_bytes();
    let key = keys
        .verifying_key(&request_message(path, &time, &nonce, &digest), &mac)
        .ok_or(AuthFailure::WrongSecret)?;
    let skew_ms = now_ms.abs_diff(time_ms);
    if skew_ms > MAX_CLOCK_SKEW.as_millis() as u64 {
        return Err(AuthFailure::Stale { skew_ms });
    }
    guard.admit(nonce, time_ms, now_ms)?;
    HeaderValue::from_str(&hex::encode(&reply_mac(key, &mac))).map_err(|_| AuthFailure::Malformed)
}

/// Checks an answer's reply header against the MAC of the call it answers.
fn verify_reply(
    keys: &ClusterKeys,
    request_header: &str,
    reply: Option<&HeaderValue>,
) -> Result<(), AuthFailure> {
    let request_mac = request_header
        .rsplit('.')
        .next()
        .and_then(hex::decode)
        .ok_or(AuthFailure::Malformed)?;
    let reply = reply
        .and_then(|value| value.to_str().ok())
        .and_then(hex::decode)
        .ok_or(AuthFailure::UnprovenAnswer)?;
    keys.verifying_key(&[REPLY_CONTEXT, &request_mac], &reply)
        .map(|_| ())
        .ok_or(AuthFailure::UnprovenAnswer)
}

fn random_nonce() -> Result<[u8; 16], getrandom::Error> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce)?;
    Ok(nonce)
}

// ---------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------

/// What the server's check needs.
#[derive(Debug, Clone)]
pub struct ServerAuth {
    /// The cluster's secrets; none means every call is accepted.
    pub keys: ClusterKeys,
    /// The nonces of recent calls.
    pub replays: Arc<ReplayGuard>,
}

/// The axum middleware that refuses calls without a valid proof and signs the
/// answers of the others.
pub async fn authenticate(
    axum::extract::State(auth): axum::extract::State<ServerAuth>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !auth.keys.is_enabled() {
        return next.run(request).await;
    }
    let peer = peer_address(&request);
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let refuse = |failure: AuthFailure| {
        tracing::warn!(peer = %peer, %path, reason = %failure, "refused a call to the node API");
        let code = match failure {
            AuthFailure::TooManyCalls => tonic::Code::ResourceExhausted,
            _ => tonic::Code::Unauthenticated,
        };
        refusal(code, &format!("this node refused the call: {failure}"))
    };
    // A call without a proof is refused before its body is read.
    if !parts.headers.contains_key(AUTH_HEADER) && !auth.keys.accept_unsigned {
        return refuse(AuthFailure::Missing);
    }
    let body = match Limited::new(body, MAX_SIGNED_BODY_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            tracing::warn!(peer = %peer, %path, %error, "refused a call to the node API: its body could not be read");
            return refusal(
                tonic::Code::InvalidArgument,
                &format!("the call's body could not be read: {error}"),
            );
        }
    };
    let verified = verify_request(
        &auth.keys,
        &auth.replays,
        parts.headers.get(AUTH_HEADER),
        &path,
        &body,
        unix_now_ms(),
    );
    match verified {
        Ok(reply) => {
            let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
            let mut response = next.run(request).await;
            response.headers_mut().insert(AUTH_REPLY_HEADER, reply);
            response
        }
        Err(AuthFailure::Missing) if auth.keys.accept_unsigned => {
            let request = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
            next.run(request).await
        }
        Err(failure) => refuse(failure),
    }
}

/// The peer's address as the listener recorded it.
pub fn peer_address<B>(request: &http::Request<B>) -> String {
    request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr)
        .map_or_else(
            || "an unknown address".to_string(),
            |addr: SocketAddr| addr.to_string(),
        )
}

/// A gRPC answer with only a status (trailers-only).
fn refusal(code: tonic::Code, message: &str) -> axum::response::Response {
    let mut response = tonic::Status::new(code, message).into_http::<axum::body::Body>();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

// ---------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------

/// A gRPC transport that signs every call and checks every answer's proof.
#[derive(Debug, Clone)]
pub struct Signed<S> {
    inner: S,
    keys: ClusterKeys,
}

impl<S> Signed<S> {
    /// Signs calls made through `inner` with `keys` (nothing when it is empty).
    pub fn new(inner: S, keys: ClusterKeys) -> Signed<S> {
        Signed { inner, keys }
    }
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> Service<http::Request<tonic::body::Body>> for Signed<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    S::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::codegen::StdError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        // The clone that was made ready is the one to call (tower's contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let keys = self.keys.clone();
        Box::pin(async move {
            let Some(key) = keys.signing_key() else {
                return inner.call(request).await.map_err(Into::into);
            };
            let (mut parts, body) = request.into_parts();
            let body: Bytes = Limited::new(body, MAX_SIGNED_BODY_BYTES)
                .collect()
                .await?
                .to_bytes();
            let header = sign_request(key, parts.uri.path(), unix_now_ms(), random_nonce()?, &body);
            parts
                .headers
                .insert(AUTH_HEADER, HeaderValue::from_str(&header)?);
            let request = http::Request::from_parts(parts, tonic::body::Body::new(Full::new(body)));
            let response = inner.call(request).await.map_err(Into::into)?;
            // A refusal by a node that knows the secret carries no proof either;
            // its status says why, so it is passed on as it is.
            let refused = response
                .headers()
                .get("grpc-status")
                .is_some_and(|status| status != "0");
            let reply = response.headers().get(AUTH_REPLY_HEADER);
            let unsigned_accepted = reply.is_none() && keys.accept_unsigned;
            match verify_reply(&keys, &header, reply) {
                Ok(()) => Ok(response),
                Err(_) if refused || unsigned_accepted => Ok(response),
                Err(failure) => Ok(refusal_response(&failure)),
            }
        })
    }
}

/// The answer a caller sees in place of an unproven one.
fn refusal_response(failure: &AuthFailure) -> http::Response<tonic::body::Body> {
    let mut response = tonic::Status::new(
        tonic::Code::Unauthenticated,
        format!("the node was not trusted: {failure}"),
    )
    .into_http::<tonic::body::Body>();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secrets: &[&str]) -> ClusterKeys {
        ClusterKeys::new(secrets.iter().map(|s| Secret::new(*s)).collect())
    }

    const NOW: u64 = 1_800_000_000_000;
    const PATH: &str = "/ltxfs.replication.v1.Replication/Stream";

    fn signed(secret: &str, nonce: u8, time: u64, body: &[u8]) -> HeaderValue {
        HeaderValue::from_str(&sign_request(
            &Secret::new(secret),
            PATH,
            time,
            [nonce; 16],
            body,
        ))
        .unwrap()
    }

    #[test]
    fn a_call_signed_with_the_secret_is_accepted_and_its_answer_proves_the_server() {
        let server = keys(&["first secret 0123", "older secret 0123"]);
        let guard = ReplayGuard::default();
        let header = signed("older secret 0123", 1, NOW, b"body");
        let reply = verify_request(&server, &guard, Some(&header), PATH, b"body", NOW + 5).unwrap();
        let client = keys(&["older secret 0123"]);
        verify_reply(&client, header.to_str().unwrap(), Some(&reply)).unwrap();
        assert_eq!(
            verify_reply(
                &keys(&["another secret 012"]),
                header.to_str().unwrap(),
                Some(&reply)
            ),
            Err(AuthFailure::UnprovenAnswer)
        );
        assert_eq!(
            verify_reply(&client, header.to_str().unwrap(), None),
            Err(AuthFailure::UnprovenAnswer)
        );
    }

    #[test]
    fn wrong_missing_altered_stale_and_replayed_calls_are_refused() {
        let server = keys(&["the cluster secret"]);
        let guard = ReplayGuard::default();
        let verify = |header: Option<&HeaderValue>, path: &str, body: &[u8], now: u64| {
            verify_request(&server, &guard, header, path, body, now).map(|_| ())
        };
        assert_eq!(verify(None, PATH, b"", NOW), Err(AuthFailure::Missing));
        let wrong = signed("not the cluster secret", 1, NOW, b"");
        assert_eq!(
            verify(Some(&wrong), PATH, b"", NOW),
            Err(AuthFailure::WrongSecret)
        );
        let good = signed("the cluster secret", 2, NOW, b"position");
        assert_eq!(
            verify(Some(&good), PATH, b"other", NOW),
            Err(AuthFailure::WrongSecret)
        );
        assert_eq!(
            verify(
                Some(&good),
                "/ltxfs.replication.v1.Replication/Promote",
                b"position",
                NOW
            ),
            Err(AuthFailure::WrongSecret)
        );
        assert_eq!(
            verify(Some(&good), PATH, b"position", NOW + 61_000),
            Err(AuthFailure::Stale { skew_ms: 61_000 })
        );
        assert_eq!(verify(Some(&good), PATH, b"position", NOW), Ok(()));
        assert_eq!(
            verify(Some(&good), PATH, b"position", NOW + 1),
            Err(AuthFailure::Replayed)
        );
        for malformed in [
            "",
            "1.2",
            "x.00.00",
            "1.zz.00",
            "1.00000000000000000000000000000000.00",
        ] {
            let header = HeaderValue::from_str(malformed).unwrap();
            assert_eq!(
                verify(Some(&header), PATH, b"", NOW),
                Err(AuthFailure::Malformed),
                "{malformed:?}"
            );
        }
    }

    #[test]
    fn accepting_unsigned_lets_calls_without_a_proof_through_but_never_a_wrong_one() {
        let guard = ReplayGuard::default();
        let server = keys(&["the cluster secret"]).accepting_unsigned(true);
        // `authenticate` passes a Missing proof through when accepting unsigned
        // calls; a wrong proof is refused as ever.
        assert_eq!(
            verify_request(&server, &guard, None, PATH, b"", NOW).map(|_| ()),
            Err(AuthFailure::Missing)
        );
        let wrong = signed("not the cluster secret", 1, NOW, b"");
        assert_eq!(
            verify_request(&server, &guard, Some(&wrong), PATH, b"", NOW).map(|_| ()),
            Err(AuthFailure::WrongSecret)
        );
    }

    #[test]
    fn the_replay_guard_forgets_nonces_once_their_calls_are_too_old_to_accept() {
        let guard = ReplayGuard::default();
        guard.admit([1; 16], NOW, NOW).unwrap();
        assert_eq!(
            guard.admit([1; 16], NOW, NOW + 59_000),
            Err(AuthFailure::Replayed)
        );
        // At the last moment the skew check accepts the call, its nonce is
        // still remembered; a moment later it is forgotten.
        let last_accepted = NOW + MAX_CLOCK_SKEW.as_millis() as u64;
        assert_eq!(
            guard.admit([1; 16], NOW, last_accepted),
            Err(AuthFailure::Replayed)
        );
        guard
            .admit([2; 16], last_accepted + 1, last_accepted + 1)
            .unwrap();
        assert_eq!(
            guard.state.lock().unwrap().seen.len(),
            1,
            "the first nonce was forgotten"
        );
    }

    #[test]
    fn the_metrics_bearer_token_is_any_secret() {
        let keys = keys(&["new secret 0123456", "old secret 0123456"]);
        assert!(keys.accepts_bearer("old secret 0123456"));
        assert!(!keys.accepts_bearer("old secret"));
        assert!(!ClusterKeys::default().accepts_bearer(""));
    }
}
