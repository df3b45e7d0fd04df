//! The lease conformance suite: one set of cases, written against the [`Lease`]
//! trait, run against every coordinator, plus tests of what only Consul has.
//!
//! Cases (module [`cases`]): acquire, renew, contention, expiry, release, handoff,
//! watch, malformed value, cluster ID, unreachable coordinator. Each runs as its
//! own test, so they run in parallel; TTLs are short (1 s on the fake), and waits
//! follow the coordinator's events (blocking watches) with deadlines, except where
//! time itself is what is tested (renewing across several TTLs, a lock-delay).
//!
//! Backends, one module of tests each:
//! - `fake_consul_expiring_at_ttl` and `fake_consul_expiring_at_twice_ttl`: the fake
//!   Consul of `tests/it/support/fake_consul.rs`, invalidating unrenewed sessions at
//!   the two ends of what Consul allows.
//! - `real_consul_when_consul_http_addr_is_set`: a real Consul at
//!   `CONSUL_HTTP_ADDR` (`host:port` or `http://host:port`; token from
//!   `CONSUL_HTTP_TOKEN`), keys under `ltxfs-conformance/`. Session TTL from
//!   `LTXFS_TEST_CONSUL_TTL` (default 10 s, Consul's least unless the agent sets
//!   `session_ttl_min`), so the expiry case takes about 2×TTL. **When
//!   `CONSUL_HTTP_ADDR` is not set these tests test nothing**: each writes a
//!   `NOT RUN` line to the test output (stderr, not captured) and passes.
//!
//! Adding a backend (etcd): implement [`Backend`] for it, then add one line
//! `conformance!(module_name, constructor);` where `constructor` is a
//! `fn(&str) -> Option<YourBackend>` (the argument is the case's name, for a
//! `NOT RUN` line when the backend is unavailable).

use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::Method;
use hyper::body::Bytes;
use ltxfs::config::ConsulConfig;
use ltxfs::lease::consul::ConsulLease;
use ltxfs::lease::http::{HttpClient, HttpResponse};
use ltxfs::lease::{Epoch, HeldLease, Lease, LeaseError, LeaseHolder, LeaseState, Unavailability};

use crate::support::fake_consul;
use crate::support::fake_consul::FakeConsul;

/// Extra time allowed over any bound, for a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(2);
/// How soon a watch must see a change (its wait is much longer).
const PROMPT: Duration = Duration::from_secs(1);
/// The pause between attempts while only time (a lock-delay) can help.
const RETRY: Duration = Duration::from_millis(50);
/// TTL and lock-delay of the fake Consul backends.
const FAKE_TTL: Duration = Duration::from_secs(1);
const FAKE_LOCK_DELAY: Duration = Duration::from_millis(500);

/// A coordinator under test.
trait Backend {
    /// Its lease type.
    type Lease: Lease + 'static;

    /// A new client of the lease at `key`: one node's view.
    fn lease(&self, key: &str) -> Self::Lease;

    /// The longest time from a holder's last renewal until another node can
    /// take the lease (expiry plus any lock-delay).
    fn takeover_bound(&self) -> Duration;

    /// Stores `value` under `key` as the value of a held lease, as a foreign or
    /// broken writer would.
    async fn put_held_value(&self, key: &str, value: &[u8]);

    /// Removes what a case left under `key`.
    async fn clean_up(&self, key: &str);

    /// A client of a coordinator address where nothing listens.
    fn unreachable_lease(&self, key: &str) -> Self::Lease;
}

/// Declares one test per case for a backend.
macro_rules! conformance {
    ($module:ident, $backend:path) => {
        conformance!(@cases $module, $backend, acquire, renew, contention, expiry,
            release, handoff, watch, malformed_value, cluster_id, unreachable);
    };
    (@cases $module:ident, $backend:path, $($case:ident),*) => {
        mod $module {
            use super::*;
            $(
                #[tokio::test]
                async fn $case() {
                    let name = concat!(stringify!($module), "::", stringify!($case));
                    if let Some(backend) = $backend(name) {
                        let key = unique_key(stringify!($case));
                        cases::$case(&backend, &key).await;
                        Backend::clean_up(&backend, &key).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    fake_consul_expiring_at_ttl,
    ConsulBackend::fake_expiring_at_ttl
);
conformance!(
    fake_consul_expiring_at_twice_ttl,
    ConsulBackend::fake_expiring_at_twice_ttl
);
conformance!(
    real_consul_when_consul_http_addr_is_set,
    ConsulBackend::real_from_env
);

/// A key no other test (or earlier run against the same real Consul) uses.
fn unique_key(case: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("ltxfs-conformance/{}-{nanos}/{case}", std::process::id())
}

/// The holder value of node `name`.
fn node(name: &str) -> LeaseHolder {
    LeaseHolder {
        hostname: name.to_string(),
        advertise_url: format!("http://{name}:20202"),
    }
}

/// The time left until `deadline` (zero once it passed).
fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Watches until `wanted` holds for the state, with blocking watches (a watch may
/// return early without a change; that is allowed and only costs a loop).
async fn watch_until<L: Lease + ?Sized>(
    lease: &L,
    mut state: LeaseState,
    deadline: Instant,
    wanted: impl Fn(&LeaseState) -> bool,
) -> LeaseState {
    while !wanted(&state) {
        assert!(
            Instant::now() < deadline,
            "the lease state never became the expected one; last: {state:?}"
        );
        state = lease
            .watch(Some(state.index), until(deadline))
            .await
            .expect("watch");
    }
    state
}

/// The holder's name in a state.
fn holder_name(state: &LeaseState) -> Option<&str> {
    state
        .holder
        .as_ref()
        .map(|(holder, _)| holder.hostname.as_str())
}

/// The cases, each generic over the backend.
mod cases {
    use super::*;

    /// A free lease is taken; everyone sees the holder at its epoch.
    pub async fn acquire<B: Backend>(backend: &B, key: &str) {
        let a = backend.lease(key);
        let other = backend.lease(key);
        let before = Instant::now();
        let held = a
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("a free lease is taken");
        assert!(held.epoch > Epoch(0));
        assert!(
            held.renew_by > Instant::now() && held.renew_by < before + a.ttl(),
            "renew_by must be in the future and before the lease can expire"
        );
        let state = other.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(state.holder, Some((node("a"), held.epoch)));
        a.release(&held).await.expect("release");
    }

    /// Renewing keeps the lease (same epoch, later deadline) well past what would
    /// have been its expiry and lock-delay.
    pub async fn renew<B: Backend>(backend: &B, key: &str) {
        let a = backend.lease(key);
        let b = backend.lease(key);
        let held = a
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("a free lease is taken");
        let end = Instant::now() + backend.takeover_bound() + a.ttl() / 2;
        let mut current = held.clone();
        while Instant::now() < end {
            tokio::time::sleep(a.ttl() / 4).await;
            let renewed = a.renew(&current).await.expect("renew");
            assert_eq!((renewed.epoch, &renewed.handle), (held.epoch, &held.handle));
            assert!(renewed.renew_by > current.renew_by);
            current = renewed;
        }
        assert!(
            b.try_acquire(&node("b")).await.expect("acquire").is_none(),
            "a renewed lease must not be taken"
        );
        let state = b.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(state.holder, Some((node("a"), held.epoch)));
        a.release(&current).await.expect("release");
    }

    /// A held lease is not taken by another node, which sees the holder.
    pub async fn contention<B: Backend>(backend: &B, key: &str) {
        let a = backend.lease(key);
        let b = backend.lease(key);
        let held = a
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("a free lease is taken");
        for _ in 0..3 {
            assert!(b.try_acquire(&node("b")).await.expect("acquire").is_none());
        }
        let state = b.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(state.holder, Some((node("a"), held.epoch)));
        // The failed attempts did not disturb the holder.
        let renewed = a.renew(&held).await.expect("renew");
        a.release(&renewed).await.expect("release");
    }

    /// An unrenewed lease is kept at least until its `renew_by`, then expires
    /// within the backend's bound; the next holder has a larger epoch and the old
    /// holder's renewal fails.
    pub async fn expiry<B: Backend>(backend: &B, key: &str) {
        let a = backend.lease(key);
        let b = backend.lease(key);
        let started = Instant::now();
        let held_a = a
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("a free lease is taken");
        let deadline = started + backend.takeover_bound() + SLACK;

        // Until a's renew_by, nobody else may take the lease.
        tokio::time::sleep_until((held_a.renew_by - RETRY).into()).await;
        assert!(
            b.try_acquire(&node("b")).await.expect("acquire").is_none(),
            "the lease was taken before its holder's renew_by"
        );

        // The coordinator drops the lease (blocking watches)...
        let state = b.watch(None, Duration::ZERO).await.expect("watch");
        watch_until(&b, state, deadline, |state| state.holder.is_none()).await;
        // ...then it is taken as soon as any lock-delay allows.
        let held_b = loop {
            if let Some(held) = b.try_acquire(&node("b")).await.expect("acquire") {
                break held;
            }
            assert!(
                Instant::now() < deadline,
                "the expired lease could not be taken within {:?}",
                backend.takeover_bound() + SLACK
            );
            tokio::time::sleep(RETRY).await;
        };
        assert!(
            started.elapsed() >= a.ttl(),
            "the lease was taken over before its TTL"
        );
        assert!(held_b.epoch > held_a.epoch, "{held_b:?} after {held_a:?}");
        assert!(matches!(a.renew(&held_a).await, Err(LeaseError::Lost(_))));
        let state = a.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(state.holder, Some((node("b"), held_b.epoch)));
        b.release(&held_b).await.expect("release");
    }

    /// A released lease is free at once (no lock-delay), at a larger epoch, and the
    /// old holder's renewal fails.
    pub async fn release<B: Backend>(backend: &B, key: &str) {
        let a = backend.lease(key);
        let b = backend.lease(key);
        let held_a = a
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("a free lease is taken");
        a.release(&held_a).await.expect("release");
        let state = b.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(state.holder, None);
        let held_b = b
            .try_acquire(&node("b"))
            .await
            .expect("acquire")
            .expect("a released lease is free at once");
        assert!(held_b.epoch > held_a.epoch, "{held_b:?} after {held_a:?}");
        assert!(matches!(a.renew(&held_a).await, Err(LeaseError::Lost(_))));
        b.release(&held_b).await.expect("release");
    }

    /// Handoff: the holder releases and the chosen candidate takes the lease
    /// immediately; the other candidate then finds it held.
    pub async fn handoff<B: Backend>(backend: &B, key: &str) {
        let a = backend.lease(key);
        let chosen = backend.lease(key);
        let other = backend.lease(key);
        let held_a = a
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("a free lease is taken");
        let start = Instant::now();
        a.release(&held_a).await.expect("release");
        let held_c = chosen
            .try_acquire(&node("c"))
            .await
            .expect("acquire")
            .expect("the chosen candidate takes the handed-off lease");
        let took = start.elapsed();
        assert!(took < PROMPT, "the handoff took {took:?}");
        assert!(held_c.epoch > held_a.epoch);
        assert!(
            other
                .try_acquire(&node("b"))
                .await
                .expect("acquire")
                .is_none()
        );
        let state = other.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(state.holder, Some((node("c"), held_c.epoch)));
        chosen.release(&held_c).await.expect("release");
    }

    /// A blocking watch returns promptly when the holder changes, and after its
    /// wait with the same answer when nothing changes.
    pub async fn watch<B: Backend>(backend: &B, key: &str) {
        let a = backend.lease(key);
        let b = backend.lease(key);
        let long = Duration::from_secs(10);
        let idle = b.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(idle.holder, None);

        // Free → held: the change is made while the watch blocks.
        let watcher = async {
            let state = watch_until(&b, idle.clone(), Instant::now() + long, |state| {
                holder_name(state) == Some("a")
            })
            .await;
            (state, Instant::now())
        };
        let changer = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let held = a
                .try_acquire(&node("a"))
                .await
                .expect("acquire")
                .expect("a free lease is taken");
            (held, Instant::now())
        };
        let ((held_state, seen_at), (held, changed_at)) = tokio::join!(watcher, changer);
        assert!(
            seen_at.saturating_duration_since(changed_at) < PROMPT,
            "the watch did not see the new holder promptly"
        );
        assert_eq!(held_state.holder, Some((node("a"), held.epoch)));

        // No change: the watch answers after its wait, with the same holder.
        let wait = Duration::from_millis(300);
        let start = Instant::now();
        let same = b.watch(Some(held_state.index), wait).await.expect("watch");
        let took = start.elapsed();
        assert_eq!(same.holder, held_state.holder);
        assert!(
            took >= wait - Duration::from_millis(20) && took < wait + SLACK,
            "a watch with nothing to report took {took:?} for a wait of {wait:?}"
        );

        // Held → free.
        let watcher = async {
            let state = watch_until(&b, same.clone(), Instant::now() + long, |state| {
                state.holder.is_none()
            })
            .await;
            (state, Instant::now())
        };
        let changer = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            a.release(&held).await.expect("release");
            Instant::now()
        };
        let ((_, seen_at), changed_at) = tokio::join!(watcher, changer);
        assert!(
            seen_at.saturating_duration_since(changed_at) < PROMPT,
            "the watch did not see the release promptly"
        );
    }

    /// Values that are not a holder's JSON are rejected with the key named, and
    /// nobody takes such a held lease.
    pub async fn malformed_value<B: Backend>(backend: &B, key: &str) {
        let incomplete = format!("{key}-incomplete");
        let values: [(&str, &[u8]); 2] =
            [(key, b"not json {"), (&incomplete, br#"{"hostname": "x"}"#)];
        for (key, value) in values {
            backend.put_held_value(key, value).await;
            let lease = backend.lease(key);
            match lease.watch(None, Duration::ZERO).await {
                Err(LeaseError::MalformedValue { key: named, .. }) => {
                    assert!(named.ends_with(key), "{named:?} does not name {key:?}")
                }
                other => panic!("{value:?} under {key:?} was not rejected: {other:?}"),
            }
            assert!(
                lease
                    .try_acquire(&node("b"))
                    .await
                    .expect("acquire")
                    .is_none()
            );
        }
        backend.clean_up(&incomplete).await;
    }

    /// The first cluster ID is stored; the same ID joins; another is refused.
    pub async fn cluster_id<B: Backend>(backend: &B, key: &str) {
        let a = backend.lease(key);
        let b = backend.lease(key);
        let c = backend.lease(key);
        assert_eq!(
            a.check_cluster_id("cluster-1").await.expect("store"),
            "cluster-1"
        );
        assert_eq!(
            b.check_cluster_id("cluster-1").await.expect("join"),
            "cluster-1"
        );
        match c.check_cluster_id("cluster-2").await {
            Err(LeaseError::ClusterMismatch { local, remote }) => {
                assert_eq!(
                    (local.as_str(), remote.as_str()),
                    ("cluster-2", "cluster-1")
                );
            }
            other => panic!("another cluster's node was not refused: {other:?}"),
        }
        // The cluster ID beside the key does not disturb the lease.
        let held = a
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("a free lease is taken");
        let state = c.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(state.holder, Some((node("a"), held.epoch)));
        a.release(&held).await.expect("release");
    }

    /// A coordinator nobody answers for is `Unavailable`, quickly.
    pub async fn unreachable<B: Backend>(backend: &B, key: &str) {
        let lease = backend.unreachable_lease(key);
        let start = Instant::now();
        let attempts = [
            lease.try_acquire(&node("a")).await.map(|_| ()),
            lease
                .watch(Some(1), Duration::from_secs(5))
                .await
                .map(|_| ()),
            lease.check_cluster_id("cluster-1").await.map(|_| ()),
        ];
        for attempt in attempts {
            assert!(
                matches!(attempt, Err(LeaseError::Unavailable { .. })),
                "{attempt:?}"
            );
        }
        assert!(start.elapsed() < SLACK);
    }
}

/// Consul, real or fake.
struct ConsulBackend {
    /// `http://host:port`.
    url: String,
    /// The ACL token for the raw requests and the leases.
    token: Option<String>,
    ttl: Duration,
    lock_delay: Duration,
    client: HttpClient,
    /// The fake, kept running while the backend lives.
    _fake: Option<FakeConsul>,
}

impl ConsulBackend {
    fn fake(expiry_factor: f64) -> ConsulBackend {
        let fake = FakeConsul::start(fake_consul::Options {
            expiry_factor,
            session_ttl_min: FAKE_TTL,
            token: None,
        });
        ConsulBackend {
            url: fake.url(),
            token: None,
            ttl: FAKE_TTL,
            lock_delay: FAKE_LOCK_DELAY,
            client: HttpClient::new(),
            _fake: Some(fake),
        }
    }

    fn fake_expiring_at_ttl(_case: &str) -> Option<ConsulBackend> {
        Some(ConsulBackend::fake(1.0))
    }

    fn fake_expiring_at_twice_ttl(_case: &str) -> Option<ConsulBackend> {
        Some(ConsulBackend::fake(2.0))
    }

    /// The real Consul at `CONSUL_HTTP_ADDR`, or `None` (and a `NOT RUN` line).
    fn real_from_env(case: &str) -> Option<ConsulBackend> {
        let Ok(addr) = std::env::var("CONSUL_HTTP_ADDR") else {
            // Written to stderr directly: the test harness does not capture it.
            let _ = writeln!(
                std::io::stderr(),
                "NOT RUN {case}: CONSUL_HTTP_ADDR is not set, so no real Consul was tested"
            );
            return None;
        };
        let host = addr.strip_prefix("http://").unwrap_or(&addr);
        assert!(
            !host.contains("://"),
            "CONSUL_HTTP_ADDR={addr}: only plain http:// Consul addresses can be tested"
        );
        let ttl = match std::env::var("LTXFS_TEST_CONSUL_TTL") {
            Ok(text) => ltxfs::config::parse_duration(&text)
                .unwrap_or_else(|error| panic!("LTXFS_TEST_CONSUL_TTL: {error}")),
            Err(_) => Duration::from_secs(10),
        };
        Some(ConsulBackend {
            url: format!("http://{}", host.trim_end_matches('/')),
            token: std::env::var(ltxfs::lease::consul::TOKEN_ENV).ok(),
            ttl,
            lock_delay: Duration::from_secs(1),
            client: HttpClient::new(),
            _fake: None,
        })
    }

    fn config(&self, url: &str, key: &str) -> ConsulConfig {
        ConsulConfig {
            url: Some(url.to_string()),
            key: Some(key.to_string()),
            ttl: self.ttl,
            lock_delay: self.lock_delay,
        }
    }

    /// One raw request to Consul's API.
    async fn raw(&self, method: Method, path: &str, body: &[u8]) -> HttpResponse {
        let headers: Vec<(&str, &str)> = self
            .token
            .as_deref()
            .map(|token| ("X-Consul-Token", token))
            .into_iter()
            .collect();
        self.client
            .request(
                method,
                &format!("{}{path}", self.url),
                &headers,
                Bytes::copy_from_slice(body),
                SLACK,
            )
            .await
            .unwrap_or_else(|error| panic!("{path}: {error}"))
    }

    /// Creates a session with behavior delete and no lock-delay; returns its ID.
    async fn raw_session(&self) -> String {
        let body = serde_json::json!({
            "Name": "ltxfs-test",
            "TTL": format!("{}ms", self.ttl.as_millis()),
            "LockDelay": "0s",
            "Behavior": "delete",
            "NodeChecks": [],
        });
        let response = self
            .raw(
                Method::PUT,
                "/v1/session/create",
                body.to_string().as_bytes(),
            )
            .await;
        let created: serde_json::Value =
            serde_json::from_slice(&response.body).expect("a session create answer");
        created["ID"].as_str().expect("a session ID").to_string()
    }
}

impl Backend for ConsulBackend {
    type Lease = ConsulLease;

    fn lease(&self, key: &str) -> ConsulLease {
        ConsulLease::with_env_token(&self.config(&self.url, key), self.token.clone())
            .expect("a Consul lease")
    }

    fn takeover_bound(&self) -> Duration {
        // Consul invalidates a session between one and two TTLs after its last
        // renewal, and the lock-delay follows.
        self.ttl * 2 + self.lock_delay
    }

    async fn put_held_value(&self, key: &str, value: &[u8]) {
        let session = self.raw_session().await;
        let response = self
            .raw(
                Method::PUT,
                &format!("/v1/kv/{key}?acquire={session}"),
                value,
            )
            .await;
        assert_eq!(&response.body[..], b"true", "{}", response.body_excerpt());
    }

    async fn clean_up(&self, key: &str) {
        self.raw(Method::DELETE, &format!("/v1/kv/{key}?recurse"), b"")
            .await;
    }

    fn unreachable_lease(&self, key: &str) -> ConsulLease {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        drop(listener);
        ConsulLease::with_env_token(&self.config(&url, key), None).expect("a Consul lease")
    }
}

/// What only Consul has, against the fake.
mod consul_with_fake {
    use super::*;

    fn fake_with(expiry_factor: f64, token: Option<&str>) -> FakeConsul {
        FakeConsul::start(fake_consul::Options {
            expiry_factor,
            session_ttl_min: Duration::from_millis(100),
            token: token.map(str::to_string),
        })
    }

    fn config(url: String, ttl: Duration, lock_delay: Duration) -> ConsulConfig {
        ConsulConfig {
            url: Some(url),
            key: Some("db".to_string()),
            ttl,
            lock_delay,
        }
    }

    async fn get(fake: &FakeConsul, path: &str) -> HttpResponse {
        HttpClient::new()
            .request(
                Method::GET,
                &format!("{}{path}", fake.url()),
                &[("X-Consul-Token", "s3cret")],
                Bytes::new(),
                SLACK,
            )
            .await
            .expect("a raw request")
    }

    #[tokio::test]
    async fn the_acl_token_comes_from_the_url_password_or_the_environment() {
        let fake = fake_with(1.0, Some("s3cret"));
        let with_password = format!("http://:s3cret@{}", &fake.url()["http://".len()..]);
        let lease =
            ConsulLease::with_env_token(&config(with_password, FAKE_TTL, FAKE_LOCK_DELAY), None)
                .expect("lease");
        let held = lease
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("taken");

        let from_env = ConsulLease::with_env_token(
            &config(fake.url(), FAKE_TTL, FAKE_LOCK_DELAY),
            Some("s3cret".to_string()),
        )
        .expect("lease");
        let state = from_env.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(state.holder, Some((node("a"), held.epoch)));

        let without =
            ConsulLease::with_env_token(&config(fake.url(), FAKE_TTL, FAKE_LOCK_DELAY), None)
                .expect("lease");
        match without.watch(None, Duration::ZERO).await {
            Err(LeaseError::Unavailable {
                reason: Unavailability::Status { status, .. },
                ..
            }) => assert_eq!(status, 403),
            other => panic!("a request without the token was not refused: {other:?}"),
        }
        lease.release(&held).await.expect("release");
    }

    #[tokio::test]
    async fn a_path_in_the_url_is_a_key_prefix() {
        let fake = fake_with(1.0, None);
        let lease = ConsulLease::with_env_token(
            &config(
                format!("{}/team/app/", fake.url()),
                FAKE_TTL,
                FAKE_LOCK_DELAY,
            ),
            None,
        )
        .expect("lease");
        assert_eq!(lease.key(), "team/app/db");
        let held = lease
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("taken");
        let response = get(&fake, "/v1/kv/team/app/db").await;
        let entries: serde_json::Value = serde_json::from_slice(&response.body).expect("JSON");
        assert_eq!(entries[0]["Session"], held.handle.as_str());
        assert_eq!(entries[0]["ModifyIndex"], held.epoch.0);
        lease.check_cluster_id("cluster-1").await.expect("store");
        let response = get(&fake, "/v1/kv/team/app/db/clusterid").await;
        assert_eq!(response.status, 200);
    }

    #[tokio::test]
    async fn a_stalled_consul_is_unavailable_within_the_request_timeout() {
        let fake = fake_with(2.0, None);
        let ttl = Duration::from_secs(2);
        let lease = ConsulLease::with_env_token(&config(fake.url(), ttl, FAKE_LOCK_DELAY), None)
            .expect("lease");
        let held = lease
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("taken");

        fake.set_stalled(true);
        let start = Instant::now();
        let renewal = lease.renew(&held).await;
        assert!(
            matches!(renewal, Err(LeaseError::Unavailable { .. })),
            "{renewal:?}"
        );
        assert!(start.elapsed() < ttl / 2 + SLACK / 4);
        fake.set_stalled(false);
        let held = lease.renew(&held).await.expect("renew once Consul answers");

        fake.set_stalled(true);
        let start = Instant::now();
        let wait = Duration::from_millis(300);
        let watched = lease.watch(Some(1), wait).await;
        assert!(
            matches!(watched, Err(LeaseError::Unavailable { .. })),
            "{watched:?}"
        );
        assert!(start.elapsed() < wait + ttl / 2 + SLACK / 4);
        fake.set_stalled(false);
        lease.release(&held).await.expect("release");
    }

    #[tokio::test]
    async fn the_lock_delay_holds_an_invalidated_key_and_epochs_still_grow() {
        let fake = fake_with(1.0, None);
        let lock_delay = Duration::from_secs(1);
        let a = ConsulLease::with_env_token(&config(fake.url(), FAKE_TTL, lock_delay), None)
            .expect("lease");
        let b = ConsulLease::with_env_token(&config(fake.url(), FAKE_TTL, lock_delay), None)
            .expect("lease");
        let held_a = a
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("taken");

        // Invalidating a's session (as an expiry would) deletes the key...
        let destroyed_at = Instant::now();
        let response = HttpClient::new()
            .request(
                Method::PUT,
                &format!("{}/v1/session/destroy/{}", fake.url(), held_a.handle),
                &[],
                Bytes::new(),
                SLACK,
            )
            .await
            .expect("destroy");
        assert_eq!(&response.body[..], b"true");
        let state = b.watch(None, Duration::ZERO).await.expect("watch");
        assert_eq!(state.holder, None);
        // ...but the lock-delay refuses it to others for a while.
        assert!(b.try_acquire(&node("b")).await.expect("acquire").is_none());
        assert_eq!(fake.session_count(), 0, "a failed attempt left its session");
        let held_b = loop {
            if let Some(held) = b.try_acquire(&node("b")).await.expect("acquire") {
                break held;
            }
            assert!(destroyed_at.elapsed() < lock_delay + SLACK);
            tokio::time::sleep(RETRY).await;
        };
        assert!(destroyed_at.elapsed() >= lock_delay);

        // The key was recreated, so Consul's LockIndex restarted; the epoch did not.
        let response = get(&fake, "/v1/kv/db").await;
        let entries: serde_json::Value = serde_json::from_slice(&response.body).expect("JSON");
        assert_eq!(entries[0]["LockIndex"], 1);
        assert!(held_b.epoch > held_a.epoch);
        b.release(&held_b).await.expect("release");
        assert_eq!(fake.session_count(), 0, "a released lease left its session");
    }

    #[tokio::test]
    async fn a_renewal_notices_that_the_key_was_taken_away() {
        let fake = fake_with(2.0, None);
        let lease =
            ConsulLease::with_env_token(&config(fake.url(), FAKE_TTL, FAKE_LOCK_DELAY), None)
                .expect("lease");
        let held = lease
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("taken");
        // An operator deletes the key while the session lives on.
        HttpClient::new()
            .request(
                Method::DELETE,
                &format!("{}/v1/kv/db", fake.url()),
                &[],
                Bytes::new(),
                SLACK,
            )
            .await
            .expect("delete");
        assert!(matches!(lease.renew(&held).await, Err(LeaseError::Lost(_))));
        lease.release(&held).await.expect("release");
        assert_eq!(fake.session_count(), 0);
    }

    /// Sanity checks of the fake itself, against Consul's documented answers.
    #[tokio::test]
    async fn the_fake_answers_as_consul_documents() {
        let fake = fake_with(1.0, None);
        let client = HttpClient::new();
        let call = |method: Method, path: &str, body: &'static [u8]| {
            let url = format!("{}{path}", fake.url());
            let client = client.clone();
            async move {
                client
                    .request(method, &url, &[], Bytes::from_static(body), SLACK)
                    .await
                    .expect("a request")
            }
        };
        // A missing key: 404 with an index.
        let missing = call(Method::GET, "/v1/kv/k", b"").await;
        assert_eq!(missing.status, 404);
        let index: u64 = missing
            .header("X-Consul-Index")
            .expect("an index")
            .parse()
            .expect("a number");
        // Create-only-if-absent, twice.
        assert_eq!(
            &call(Method::PUT, "/v1/kv/k?cas=0", b"v1").await.body[..],
            b"true"
        );
        assert_eq!(
            &call(Method::PUT, "/v1/kv/k?cas=0", b"v2").await.body[..],
            b"false"
        );
        let found = call(Method::GET, "/v1/kv/k", b"").await;
        let entries: serde_json::Value = serde_json::from_slice(&found.body).expect("JSON");
        assert_eq!(entries[0]["Value"], "djE=");
        assert!(entries[0]["ModifyIndex"].as_u64().expect("an index") > index);
        // A TTL below the minimum is refused; an unknown session cannot acquire.
        let refused = call(Method::PUT, "/v1/session/create", br#"{"TTL": "10ms"}"#).await;
        assert_eq!(refused.status, 400);
        let invalid = call(Method::PUT, "/v1/kv/k?acquire=nope", b"").await;
        assert_eq!(invalid.status, 500);
        // Renewing an unknown session is a 404; its info is an empty list.
        assert_eq!(
            call(Method::PUT, "/v1/session/renew/nope", b"")
                .await
                .status,
            404
        );
        assert_eq!(
            &call(Method::GET, "/v1/session/info/nope", b"").await.body[..],
            b"[]"
        );
    }

    #[tokio::test]
    async fn an_empty_cluster_id_is_not_stored() {
        let fake = fake_with(1.0, None);
        let lease =
            ConsulLease::with_env_token(&config(fake.url(), FAKE_TTL, FAKE_LOCK_DELAY), None)
                .expect("lease");
        assert!(matches!(
            lease.check_cluster_id(" ").await,
            Err(LeaseError::MalformedValue { .. })
        ));
        assert_eq!(get(&fake, "/v1/kv/db/clusterid").await.status, 404);
    }

    /// `renew_by` is half the TTL after the first request of the acquisition.
    #[tokio::test]
    async fn renew_by_is_half_the_ttl_after_the_request() {
        let fake = fake_with(1.0, None);
        let ttl = Duration::from_secs(2);
        let lease = ConsulLease::with_env_token(&config(fake.url(), ttl, FAKE_LOCK_DELAY), None)
            .expect("lease");
        let before = Instant::now();
        let held: HeldLease = lease
            .try_acquire(&node("a"))
            .await
            .expect("acquire")
            .expect("taken");
        assert!(held.renew_by >= before + ttl / 2);
        assert!(held.renew_by <= Instant::now() + ttl / 2);
        lease.release(&held).await.expect("release");
    }
}
