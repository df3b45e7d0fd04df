//! The write-forwarding proxy end to end: three `ltxfs mount` processes electing
//! their primary with a real etcd, each with the example web app
//! (`examples/app.rs`, built by `cargo test`) behind its proxy.
//!
//! node-a starts as the primary; node-b is a candidate whose proxy forwards
//! writes; node-c is a replica whose proxy answers writes with `fly-replay`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::etcd;
use hyper::body::Bytes;
use ltxfs::lease::http::{HttpClient, HttpResponse};

const DB: &str = "app.db";
const TIMEOUT: Duration = Duration::from_secs(20);

/// One node: its mount, its proxy's address and its app.
struct Node {
    name: &'static str,
    mount: Mount,
    proxy: SocketAddr,
    _app: App,
}

impl Node {
    fn start(name: &'static str, candidate: bool, mode: &str, etcd_url: &str) -> Node {
        let (proxy, app) = (free_loopback_address(), free_loopback_address());
        let mount = Mount::start(MountOptions {
            extra_yaml: format!(
                "lease:\n  type: etcd\n  candidate: {candidate}\n  hostname: {name}\n  reconnect-delay: 300ms\n  etcd:\n    endpoints: [\"{etcd_url}\"]\n    key: \"ltxfs-proxy/primary\"\n    ttl: 2s\nproxy:\n  addr: \"{proxy}\"\n  target: \"{app}\"\n  db: {DB}\n  mode: {mode}\n  primary-redirect-timeout: 5s\n"
            ),
            ..MountOptions::default()
        });
        let app = App::start(app, &mount.db_path(DB), name);
        Node {
            name,
            mount,
            proxy,
            _app: app,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    fn node_url(&self) -> String {
        format!("http://{}", self.mount.listen_addr())
    }
}

/// The example app, killed when dropped.
struct App {
    child: Child,
}

impl App {
    fn start(listen: SocketAddr, db: &Path, name: &str) -> App {
        let child = Command::new(example_app())
            .args(["--listen", &listen.to_string(), "--db"])
            .arg(db)
            .args(["--name", name])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the example app");
        let app = App { child };
        wait_until("the app to listen", TIMEOUT, || {
            std::net::TcpStream::connect(listen).is_ok()
        });
        app
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example app `cargo test` built next to this test binary.
fn example_app() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in <target>/<profile>/deps");
    let app = target.join("examples").join("app");
    assert!(
        app.exists(),
        "{} is missing: `cargo test` builds it; run `cargo build --example app`",
        app.display()
    );
    app
}

/// One HTTP request on a runtime of its own.
fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &str) -> HttpResponse {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(HttpClient::new().request(
            method.parse().unwrap(),
            url,
            headers,
            Bytes::from(body.to_string()),
            Duration::from_secs(10),
        ))
        .unwrap_or_else(|error| panic!("{method} {url}: {error}"))
}

fn body(response: &HttpResponse) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

/// The `name=value` part of the response's `__txid` cookie.
fn txid_cookie(response: &HttpResponse) -> String {
    let set_cookie = response
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no Set-Cookie in {response:?}"));
    let cookie = set_cookie.split(';').next().unwrap().to_string();
    assert!(cookie.starts_with("__txid="), "{set_cookie}");
    cookie
}

fn is_primary(node: &Node) -> bool {
    !node.mount.path().join(".primary").exists()
        && request("GET", &node.url("/ltxfs/health"), &[], "").status == 200
        && body(&request("GET", &node.url("/ltxfs/health"), &[], "")).starts_with("primary")
}

fn position(node: &Node) -> Option<String> {
    std::fs::read_to_string(node.mount.db_path(&format!("{DB}-pos"))).ok()
}

#[test]
fn the_proxy_sends_writes_to_the_primary_and_reads_see_them() {
    let etcd = etcd::start();
    let node_a = Node::start("node-a", true, "forward", etcd.url());
    wait_until("node-a to be the primary", TIMEOUT, || is_primary(&node_a));
    let created = request("POST", &node_a.url("/items"), &[], "first");
    assert_eq!(created.status, 200, "{}", body(&created));
    assert_eq!(body(&created), "created 1 on node-a\n");
    txid_cookie(&created);
    let node_b = Node::start("node-b", true, "forward", etcd.url());
    let node_c = Node::start("node-c", false, "replay", etcd.url());
    wait_until("the replicas to catch up", TIMEOUT, || {
        position(&node_b) == position(&node_a) && position(&node_c) == position(&node_a)
    });

    // Forward mode: the primary's app answers; the cookie makes the next read on
    // the replica wait for the write.
    let forwarded = request("POST", &node_b.url("/items"), &[], "second");
    assert_eq!(forwarded.status, 200, "{}", body(&forwarded));
    assert_eq!(body(&forwarded), "created 2 on node-a\n");
    let cookie = txid_cookie(&forwarded);
    let listed = request("GET", &node_b.url("/items"), &[("cookie", &cookie)], "");
    assert_eq!(body(&listed), "1\tfirst\n2\tsecond\n");

    // Replay mode: an empty answer telling Fly.io's edge where to replay it.
    let replayed = request("POST", &node_c.url("/items"), &[], "third");
    assert_eq!(replayed.status, 200);
    assert_eq!(replayed.header("fly-replay"), Some("instance=node-a"));
    assert!(replayed.body.is_empty());

    // Health.
    let health = request("GET", &node_b.url("/ltxfs/health"), &[], "");
    assert_eq!(health.status, 200, "{}", body(&health));
    assert!(
        body(&health).starts_with("replica of node-a"),
        "{}",
        body(&health)
    );

    // A WebSocket through the proxy.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", node_b.proxy))
            .await
            .expect("a WebSocket through the proxy");
        socket.send(Message::text("hello")).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("an echo")
            .unwrap()
            .unwrap();
        assert_eq!(echoed, Message::text("hello"));
    });

    // Writes issued through both proxies during a handoff all succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = [node_a.url("/items"), node_b.url("/items")]
        .into_iter()
        .enumerate()
        .map(|(writer, url)| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut outcomes = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    let response = request("POST", &url, &[], &format!("w{writer}-{n}"));
                    outcomes.push((response.status.as_u16(), body(&response)));
                    n += 1;
                }
                outcomes
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let promoted = ltxfs_command()
        .args(["promote", "--url", &node_b.node_url()])
        .output()
        .unwrap();
    assert!(
        promoted.status.success(),
        "{}",
        String::from_utf8_lossy(&promoted.stderr)
    );
    let promotion = started.elapsed();
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    let outcomes: Vec<(u16, String)> = writers
        .into_iter()
        .flat_map(|writer| writer.join().unwrap())
        .collect();
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect();
    assert!(
        failed.is_empty(),
        "writes failed during the handoff: {failed:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|(_, text)| text.ends_with("on node-a\n"))
            && outcomes
                .iter()
                .any(|(_, text)| text.ends_with("on node-b\n")),
        "the writes did not reach both primaries in turn"
    );
    report(format!(
        "{} writes through the proxies during a handoff ({promotion:?}), none failed",
        outcomes.len()
    ));
    wait_until("node-b to be the primary", TIMEOUT, || is_primary(&node_b));

    // Health fails on a replica cut off from its primary.
    let mut node_b = node_b;
    node_b.mount.kill9();
    let cut_at = Instant::now();
    let mut reason = String::new();
    wait_until("node-c's health to fail", TIMEOUT, || {
        let health = request("GET", &node_c.url("/ltxfs/health"), &[], "");
        reason = body(&health);
        health.status == 503
    });
    report(format!(
        "health on {} failed {:?} after its primary died: {}",
        node_c.name,
        cut_at.elapsed(),
        reason.trim()
    ));
}
