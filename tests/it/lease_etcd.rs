//! The etcd lease against a real etcd: the backend-independent conformance cases
//! (module [`cases`]) and etcd-specific faults.
//!
//! Every test starts its own etcd on loopback ([`etcd_server::start`]) and uses a
//! two-second TTL, so the file runs in seconds. Each case is bounded by
//! [`CASE_TIMEOUT`]; waits are on events (a watch returning, a call answering),
//! except where time passing is what is tested (renewing past the TTL).

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::common::free_loopback_address;
use crate::support::etcd::{self as etcd_server, Etcd};
use ltxfs::config::EtcdConfig;
use ltxfs::lease::etcd::{EtcdLease, cluster_id_key};
use ltxfs::lease::{Epoch, HeldLease, Lease, LeaseError};

/// The lease key of every test (each test has its own etcd).
const KEY: &str = "ltxfs/test/primary";
/// The TTL of the leases under test: above the 1 s minimum of the test etcd's raft
/// timings, with room for a loaded machine.
const TTL: Duration = Duration::from_secs(2);
/// The longest any test may run.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);
/// How fast an unreachable etcd must be reported with one endpoint: the request
/// bound for a 2 s TTL is 0.5 s.
const UNAVAILABLE_BOUND: Duration = Duration::from_millis(1500);

/// A client of [`KEY`] with these endpoints.
fn client(endpoints: &[&str]) -> EtcdLease {
    EtcdLease::new(&EtcdConfig {
        endpoints: endpoints.iter().map(|url| url.to_string()).collect(),
        key: Some(KEY.to_string()),
        ttl: TTL,
    })
    .expect("a valid etcd configuration")
}

/// Runs `case`, failing when it takes longer than [`CASE_TIMEOUT`].
async fn bounded(case: impl Future<Output = ()>) {
    tokio::time::timeout(CASE_TIMEOUT, case)
        .await
        .unwrap_or_else(|_| panic!("the case took longer than {CASE_TIMEOUT:?}"));
}

/// Stores `value` under `key` in `etcd` directly, bypassing the lease code.
fn put(etcd: &Etcd, key: &str, value: &[u8]) {
    let body = format!(
        r#"{{"key":"{}","value":"{}"}}"#,
        BASE64.encode(key),
        BASE64.encode(value)
    );
    post(etcd, "/v3/kv/put", &body);
}

/// Compacts `etcd`'s history up to `revision`: older revisions can no longer
/// be watched.
fn compact(etcd: &Etcd, revision: u64) {
    post(
        etcd,
        "/v3/kv/compaction",
        &format!(r#"{{"revision":"{revision}","physical":true}}"#),
    );
}

/// POSTs `body` to etcd's JSON gateway at `path`; panics unless it answers 200.
fn post(etcd: &Etcd, path: &str, body: &str) {
    let headers = [("Content-Type", "application/json")];
    match test_support::http::request(etcd.address(), "POST", path, &headers, body) {
        Ok(answer) if answer.status == 200 => {}
        other => panic!("POST {path} {body} to etcd failed: {other:?}"),
    }
}

/// A lease handle of the etcd format, for calls that must fail before reaching
/// etcd's lease logic.
fn some_handle() -> HeldLease {
    HeldLease {
        epoch: Epoch(1),
        handle: "0000000000000001".to_string(),
        renew_by: Instant::now(),
    }
}

#[tokio::test]
async fn acquire() {
    let etcd = etcd_server::start();
    bounded(cases::acquire(|| client(&[etcd.url()]))).await;
}

#[tokio::test]
async fn renew() {
    let etcd = etcd_server::start();
    bounded(cases::renew(|| client(&[etcd.url()]))).await;
}

#[tokio::test]
async fn contention() {
    let etcd = etcd_server::start();
    bounded(cases::contention(|| client(&[etcd.url()]))).await;
}

#[tokio::test]
async fn expiry() {
    let etcd = etcd_server::start();
    bounded(cases::expiry(|| client(&[etcd.url()]))).await;
}

#[tokio::test]
async fn release() {
    let etcd = etcd_server::start();
    bounded(cases::release(|| client(&[etcd.url()]))).await;
}

#[tokio::test]
async fn handoff() {
    let etcd = etcd_server::start();
    bounded(cases::handoff(|| client(&[etcd.url()]))).await;
}

#[tokio::test]
async fn watch() {
    let etcd = etcd_server::start();
    bounded(cases::watch(|| client(&[etcd.url()]))).await;
}

#[tokio::test]
async fn malformed_values_are_rejected() {
    let etcd = etcd_server::start();
    bounded(async {
        cases::malformed_value(
            || client(&[etcd.url()]),
            |value| {
                put(&etcd, KEY, value);
                std::future::ready(())
            },
        )
        .await;
        // A candidate is not misled either: it reports the value instead of
        // waiting for a holder that does not exist.
        put(&etcd, KEY, b"{\"hostname\": 1}");
        let attempt = client(&[etcd.url()])
            .try_acquire(&cases::node("a"))
            .await;
        assert!(
            matches!(attempt, Err(LeaseError::MalformedValue { ref key, .. }) if key == KEY),
            "{attempt:?}"
        );
        // A malformed cluster ID is reported under its own key.
        let cluster_key = cluster_id_key(KEY);
        put(&etcd, &cluster_key, b"\xff\xfe");
        let checked = client(&[etcd.url()]).check_cluster_id("c1").await;
        assert!(
            matches!(checked, Err(LeaseError::MalformedValue { ref key, .. }) if *key == cluster_key),
            "{checked:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn cluster_id_mismatch() {
    let etcd = etcd_server::start();
    bounded(cases::cluster_id(|| client(&[etcd.url()]))).await;
}

#[tokio::test]
async fn unreachable_etcd_is_unavailable_quickly() {
    // Nothing listens on this port: connections are refused at once.
    let nobody = format!("http://{}", free_loopback_address());
    bounded(cases::unavailable(
        client(&[&nobody]),
        some_handle(),
        UNAVAILABLE_BOUND,
    ))
    .await;
}

#[tokio::test]
async fn silent_etcd_is_unavailable_within_the_request_bound() {
    // A server that accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a silent server");
    let silent = format!("http://{}", listener.local_addr().expect("its address"));
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            held.push(connection);
        }
    });
    bounded(cases::unavailable(
        client(&[&silent]),
        some_handle(),
        UNAVAILABLE_BOUND,
    ))
    .await;
    server.abort();
}

#[tokio::test]
async fn endpoints_are_tried_in_order() {
    let etcd = etcd_server::start();
    let nobody = format!("http://{}", free_loopback_address());
    bounded(async {
        cases::acquire(|| client(&[&nobody, etcd.url()])).await;
        // Once the second endpoint answered, it is asked first.
        let lease = client(&[&nobody, etcd.url()]);
        lease.watch(None, Duration::ZERO).await.expect("read");
        let start = Instant::now();
        for _ in 0..5 {
            lease.watch(None, Duration::ZERO).await.expect("read");
        }
        assert!(start.elapsed() < Duration::from_secs(1));
    })
    .await;
}

#[tokio::test]
async fn a_watch_fails_promptly_when_etcd_stops() {
    let etcd = etcd_server::start();
    let watcher = client(&[etcd.url()]);
    bounded(async {
        let since = watcher
            .watch(None, Duration::ZERO)
            .await
            .expect("read")
            .index;
        let start = Instant::now();
        let (result, ()) =
            tokio::join!(watcher.watch(Some(since), Duration::from_secs(20)), async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                drop(etcd);
            });
        assert!(
            matches!(result, Err(LeaseError::Unavailable { .. })),
            "{result:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the watch noticed after {:?}",
            start.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn a_watch_from_a_position_etcd_cannot_watch_answers_at_once() {
    let etcd = etcd_server::start();
    bounded(async {
        let a = client(&[etcd.url()]);
        let first = a.watch(None, Duration::ZERO).await.expect("read").index;
        for _ in 0..3 {
            let held = a
                .try_acquire(&cases::node("a"))
                .await
                .expect("acquire")
                .expect("a free lease");
            a.release(&held).await.expect("release");
        }
        let held = a
            .try_acquire(&cases::node("a"))
            .await
            .expect("acquire")
            .expect("a free lease");
        let now = a.watch(None, Duration::ZERO).await.expect("read");
        compact(&etcd, now.index);
        // The changes after `first` are compacted away, and a position ahead of the
        // store (a restored or new etcd) will never be reached: both answer at once
        // with the current state instead of waiting.
        for since in [first, now.index + 1000] {
            let start = Instant::now();
            let state = a
                .watch(Some(since), Duration::from_secs(20))
                .await
                .expect("watch");
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "the watch from {since} waited {:?}",
                start.elapsed()
            );
            assert_eq!(state.holder, Some((cases::node("a"), held.epoch)));
        }
    })
    .await;
}

#[tokio::test]
async fn an_old_holder_cannot_renew_after_its_key_is_replaced() {
    let etcd = etcd_server::start();
    bounded(async {
        let a = client(&[etcd.url()]);
        let held = a
            .try_acquire(&cases::node("a"))
            .await
            .expect("acquire")
            .expect("a free lease");
        // Someone overwrites the key by hand: the etcd lease lives on, the key is
        // no longer bound to it.
        put(
            &etcd,
            KEY,
            br#"{"hostname":"intruder","advertise-url":"http://intruder:20202"}"#,
        );
        let renewed = a.renew(&held).await;
        assert!(matches!(renewed, Err(LeaseError::Lost(_))), "{renewed:?}");
        // A handle that is not an etcd lease ID cannot be renewed either.
        let bogus = HeldLease {
            handle: "not-a-lease".to_string(),
            ..held
        };
        assert!(matches!(a.renew(&bogus).await, Err(LeaseError::Lost(_))));
    })
    .await;
}

/// The conformance cases, independent of the coordinator: each takes a factory of
/// clients of one lease key (a new client per simulated node) and panics on a
/// violation of the [`Lease`] invariants. Timings derive from [`Lease::ttl`], and
/// bounds leave room for Consul's lock-delay and its up-to-2×TTL expiry.
mod cases {
    use std::time::{Duration, Instant};

    use ltxfs::lease::{HeldLease, Lease, LeaseError, LeaseHolder, LeaseState};

    /// How long a coordinator on loopback may take to answer or to report a change.
    const PROMPT: Duration = Duration::from_secs(2);
    /// How long the chosen candidate may take to hold the lease after a release.
    const HANDOFF_BOUND: Duration = Duration::from_secs(1);

    /// The holder value of node `name`.
    pub fn node(name: &str) -> LeaseHolder {
        LeaseHolder {
            hostname: name.to_string(),
            advertise_url: format!("http://{name}:20202"),
        }
    }

    /// The lease's state now.
    async fn state(lease: &impl Lease) -> LeaseState {
        lease
            .watch(None, Duration::ZERO)
            .await
            .expect("read the lease")
    }

    /// Takes the lease for `name`, which must be free.
    async fn take(lease: &impl Lease, name: &str) -> HeldLease {
        lease
            .try_acquire(&node(name))
            .await
            .expect("try to acquire")
            .unwrap_or_else(|| panic!("{name} could not take a free lease"))
    }

    /// Takes the lease for `name` once it is free, trying until `deadline` (a
    /// coordinator may keep a lock-delay after an expiry).
    async fn take_by(lease: &impl Lease, name: &str, deadline: Instant) -> HeldLease {
        loop {
            if let Some(held) = lease
                .try_acquire(&node(name))
                .await
                .expect("try to acquire")
            {
                return held;
            }
            assert!(
                Instant::now() < deadline,
                "{name} could not take the free lease in time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Watches from `state` until `done` holds for the state, by `deadline`.
    async fn watch_until(
        lease: &impl Lease,
        mut state: LeaseState,
        deadline: Instant,
        done: impl Fn(&LeaseState) -> bool,
    ) -> LeaseState {
        while !done(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "the lease did not reach the expected state: {state:?}"
            );
            state = lease.watch(Some(state.index), left).await.expect("watch");
        }
        state
    }

    /// A free lease is taken, with a renewal deadline before it can expire, and
    /// everyone sees the holder and its epoch.
    pub async fn acquire<L: Lease>(new_client: impl Fn() -> L) {
        let a = new_client();
        let observer = new_client();
        assert_eq!(state(&observer).await.holder, None);
        let sent = Instant::now();
        let held = take(&a, "a").await;
        assert!(held.renew_by > Instant::now(), "the lease is due at once");
        assert!(
            held.renew_by <= sent + a.ttl(),
            "renew_by is after the lease could have expired"
        );
        assert_eq!(state(&observer).await.holder, Some((node("a"), held.epoch)));
    }

    /// Renewing keeps the lease past its TTL, with the same epoch and handle.
    pub async fn renew<L: Lease>(new_client: impl Fn() -> L) {
        let a = new_client();
        let b = new_client();
        let ttl = a.ttl();
        let mut held = take(&a, "a").await;
        let until = Instant::now() + ttl * 3 / 2;
        while Instant::now() < until {
            tokio::time::sleep(ttl / 5).await;
            let sent = Instant::now();
            let renewed = a.renew(&held).await.expect("renew");
            assert_eq!((renewed.epoch, &renewed.handle), (held.epoch, &held.handle));
            assert!(
                renewed.renew_by >= held.renew_by,
                "renewal moved the deadline back"
            );
            assert!(
                renewed.renew_by <= sent + ttl,
                "renew_by is after a possible expiry"
            );
            held = renewed;
        }
        assert!(
            b.try_acquire(&node("b")).await.expect("try").is_none(),
            "a renewed lease was taken"
        );
        assert_eq!(state(&b).await.holder, Some((node("a"), held.epoch)));
    }

    /// Of candidates racing for a free lease exactly one wins; the others get
    /// `None`, then and later.
    pub async fn contention<L: Lease>(new_client: impl Fn() -> L) {
        let clients = [new_client(), new_client(), new_client()];
        let names = ["a", "b", "c"];
        let holders = names.map(node);
        let (a, b, c) = tokio::join!(
            clients[0].try_acquire(&holders[0]),
            clients[1].try_acquire(&holders[1]),
            clients[2].try_acquire(&holders[2]),
        );
        let results = [
            a.expect("a tries"),
            b.expect("b tries"),
            c.expect("c tries"),
        ];
        let winners: Vec<usize> = (0..3).filter(|&i| results[i].is_some()).collect();
        assert_eq!(winners.len(), 1, "winners: {winners:?}");
        let winner = winners[0];
        for loser in (0..3).filter(|&i| i != winner) {
            assert!(
                clients[loser]
                    .try_acquire(&node(names[loser]))
                    .await
                    .expect("try again")
                    .is_none(),
                "{} took a held lease",
                names[loser]
            );
        }
        let epoch = results[winner].as_ref().map(|held| held.epoch);
        let seen = state(&clients[0]).await.holder;
        assert_eq!(
            seen.map(|(holder, epoch)| (holder, Some(epoch))),
            Some((node(names[winner]), epoch))
        );
    }

    /// A holder that stops renewing loses the lease after its TTL, not before;
    /// then another candidate takes it with a larger epoch and the old holder
    /// cannot renew.
    pub async fn expiry<L: Lease>(new_client: impl Fn() -> L) {
        let a = new_client();
        let b = new_client();
        let ttl = a.ttl();
        let sent = Instant::now();
        let held = take(&a, "a").await;
        assert!(
            b.try_acquire(&node("b")).await.expect("try").is_none(),
            "the lease was taken before its TTL"
        );
        let deadline = sent + ttl * 2 + Duration::from_secs(5);
        let free = watch_until(&b, state(&b).await, deadline, |state| {
            state.holder.is_none()
        })
        .await;
        let expired_after = sent.elapsed();
        assert!(
            expired_after >= ttl,
            "the lease expired after {expired_after:?}, before its TTL of {ttl:?}"
        );
        let taken = take_by(&b, "b", deadline).await;
        assert!(taken.epoch > held.epoch, "{taken:?} after {held:?}");
        assert!(matches!(a.renew(&held).await, Err(LeaseError::Lost(_))));
        let now = watch_until(&a, free, deadline, |state| state.holder.is_some()).await;
        assert_eq!(now.holder, Some((node("b"), taken.epoch)));
    }

    /// A released lease is free at once, with a larger epoch for the next holder;
    /// the old holder can neither renew nor disturb the new one.
    pub async fn release<L: Lease>(new_client: impl Fn() -> L) {
        let a = new_client();
        let b = new_client();
        let held = take(&a, "a").await;
        a.release(&held).await.expect("release");
        let taken = take(&b, "b").await;
        assert!(taken.epoch > held.epoch, "{taken:?} after {held:?}");
        assert!(matches!(a.renew(&held).await, Err(LeaseError::Lost(_))));
        // A late second release of the old lease must not free the new holder's.
        let _ = a.release(&held).await;
        assert_eq!(state(&a).await.holder, Some((node("b"), taken.epoch)));
        b.renew(&taken).await.expect("the new holder renews");
    }

    /// Handoff: the holder releases and the chosen candidate takes the lease at
    /// once, while a third node watching sees the change promptly and stays a
    /// follower.
    pub async fn handoff<L: Lease>(new_client: impl Fn() -> L) {
        let a = new_client();
        let b = new_client();
        let c = new_client();
        let held = take(&a, "a").await;
        let before = state(&c).await;
        assert_eq!(before.holder, Some((node("a"), held.epoch)));
        let watching = async {
            let start = Instant::now();
            let seen = c.watch(Some(before.index), Duration::from_secs(20)).await;
            (seen.expect("watch"), start.elapsed())
        };
        let handing_off = async {
            let start = Instant::now();
            a.release(&held).await.expect("release");
            let taken = take(&b, "b").await;
            (taken, start.elapsed())
        };
        let ((seen, waited), (taken, took)) = tokio::join!(watching, handing_off);
        assert!(took < HANDOFF_BOUND, "the handoff took {took:?}");
        assert!(taken.epoch > held.epoch, "{taken:?} after {held:?}");
        assert!(
            waited < took + PROMPT,
            "the watch saw the handoff after {waited:?}"
        );
        assert_ne!(
            seen.holder, before.holder,
            "the watch returned without a change"
        );
        let deadline = Instant::now() + PROMPT;
        let after = watch_until(&c, seen, deadline, |state| state.holder.is_some()).await;
        assert_eq!(after.holder, Some((node("b"), taken.epoch)));
        assert!(c.try_acquire(&node("c")).await.expect("try").is_none());
    }

    /// A watch returns promptly when the holder changes, and otherwise after its
    /// wait with the same answer; renewals do not wake it.
    pub async fn watch<L: Lease>(new_client: impl Fn() -> L) {
        let a = new_client();
        let w = new_client();
        let initial = state(&w).await;
        assert_eq!(initial.holder, None);
        // The watch is blocked before the change happens.
        let pause = Duration::from_millis(200);
        let watching = async {
            let start = Instant::now();
            let seen = w.watch(Some(initial.index), Duration::from_secs(20)).await;
            (seen.expect("watch"), start.elapsed())
        };
        let acquiring = async {
            tokio::time::sleep(pause).await;
            take(&a, "a").await
        };
        let ((seen, waited), held) = tokio::join!(watching, acquiring);
        assert!(
            waited < pause + PROMPT,
            "the watch saw the change after {waited:?}"
        );
        assert_eq!(seen.holder, Some((node("a"), held.epoch)));

        // No change: the watch waits out its time, through a renewal.
        let wait = Duration::from_millis(800);
        let start = Instant::now();
        let (quiet, renewed) = tokio::join!(w.watch(Some(seen.index), wait), a.renew(&held));
        let waited = start.elapsed();
        let quiet = quiet.expect("watch");
        renewed.expect("renew");
        assert!(
            waited >= wait * 9 / 10,
            "the watch returned after {waited:?} without a change"
        );
        assert!(
            waited < wait + PROMPT,
            "the watch overstayed its wait: {waited:?}"
        );
        assert_eq!(quiet.holder, seen.holder);

        // A release wakes it too.
        let watching = async {
            let start = Instant::now();
            let seen = w.watch(Some(quiet.index), Duration::from_secs(20)).await;
            (seen.expect("watch"), start.elapsed())
        };
        let releasing = async {
            tokio::time::sleep(pause).await;
            a.release(&held).await.expect("release");
        };
        let ((released, waited), ()) = tokio::join!(watching, releasing);
        assert!(
            waited < pause + PROMPT,
            "the watch saw the release after {waited:?}"
        );
        assert_eq!(released.holder, None);
    }

    /// Values under the lease key that are not a holder are reported as
    /// malformed. `store_value` writes raw bytes under the lease key.
    pub async fn malformed_value<L: Lease, F: Future<Output = ()>>(
        new_client: impl Fn() -> L,
        store_value: impl Fn(&'static [u8]) -> F,
    ) {
        let w = new_client();
        let values: [&'static [u8]; 7] = [
            b"not json",
            b"",
            b"\xff\xfe",
            b"[1, 2]",
            b"{\"hostname\": \"a\"}",
            b"{\"hostname\": \"a\", \"advertise-url\": 5}",
            b"{\"hostname\": \"\", \"advertise-url\": \"\"}",
        ];
        for value in values {
            store_value(value).await;
            let seen = w.watch(None, Duration::ZERO).await;
            assert!(
                matches!(seen, Err(LeaseError::MalformedValue { .. })),
                "{:?} gave {seen:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    /// The first node stores its cluster ID; nodes of the same cluster agree, a
    /// node of another cluster is refused, and the ID outlives the lease.
    pub async fn cluster_id<L: Lease>(new_client: impl Fn() -> L) {
        let a = new_client();
        let b = new_client();
        assert_eq!(
            a.check_cluster_id("cluster-1").await.expect("store"),
            "cluster-1"
        );
        assert_eq!(
            b.check_cluster_id("cluster-1").await.expect("agree"),
            "cluster-1"
        );
        let other = b.check_cluster_id("cluster-2").await;
        match &other {
            Err(error @ LeaseError::ClusterMismatch { local, remote }) => {
                assert_eq!(
                    (local.as_str(), remote.as_str()),
                    ("cluster-2", "cluster-1")
                );
                assert!(error.to_string().contains("refusing to join"), "{error}");
            }
            _ => panic!("another cluster's node was let in: {other:?}"),
        }
        let held = take(&a, "a").await;
        a.release(&held).await.expect("release");
        assert!(matches!(
            b.check_cluster_id("cluster-2").await,
            Err(LeaseError::ClusterMismatch { .. })
        ));
    }

    /// Every call on a coordinator that cannot answer fails with
    /// [`LeaseError::Unavailable`] within `bound`. `held` is a handle of the
    /// backend's format.
    pub async fn unavailable<L: Lease>(lease: L, held: HeldLease, bound: Duration) {
        async fn check<T: std::fmt::Debug>(
            what: &str,
            bound: Duration,
            call: impl Future<Output = Result<T, LeaseError>>,
        ) {
            let start = Instant::now();
            let result = call.await;
            let took = start.elapsed();
            assert!(
                matches!(result, Err(LeaseError::Unavailable { .. })),
                "{what} gave {result:?}"
            );
            assert!(took <= bound, "{what} took {took:?}");
        }
        check("try_acquire", bound, lease.try_acquire(&node("a"))).await;
        check("renew", bound, lease.renew(&held)).await;
        check("release", bound, lease.release(&held)).await;
        check("watch", bound, lease.watch(None, Duration::ZERO)).await;
        check(
            "a waiting watch",
            bound,
            lease.watch(Some(1), Duration::from_secs(20)),
        )
        .await;
        check(
            "check_cluster_id",
            bound,
            lease.check_cluster_id("cluster-1"),
        )
        .await;
    }
}
