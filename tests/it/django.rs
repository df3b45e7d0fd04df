//! Smoke test of the Django example (`examples/django`) on a primary and a
//! replica: migrations on the primary, a write there, the write read on the
//! replica, and a write on the replica answered with `fly-replay` by the
//! example's middleware.
//!
//! Django runs from the virtualenv `.ci/run` creates (`target/django-venv`), or
//! from the Python interpreter named by `LTXFS_DJANGO_PYTHON`. Without either the
//! test fails and says how to create it; it never passes silently.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::*;
use hyper::body::Bytes;
use ltxfs::lease::http::{HttpClient, HttpResponse};

const DB: &str = "app.db";
const TIMEOUT: Duration = Duration::from_secs(30);

fn django_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/django")
}

/// The Python interpreter with Django installed.
fn python() -> PathBuf {
    let python = std::env::var_os("LTXFS_DJANGO_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/django-venv/bin/python"),
        PathBuf::from,
    );
    let works = Command::new(&python)
        .args(["-c", "import django"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        works,
        "{} cannot import Django. Run `bash .ci/run`, or: python3 -m venv target/django-venv && \
         target/django-venv/bin/pip install -r examples/django/requirements.txt \
         (or set LTXFS_DJANGO_PYTHON)",
        python.display()
    );
    python
}

fn manage(python: &Path, db: &Path, node: &str) -> Command {
    let mut command = Command::new(python);
    command
        .arg("manage.py")
        .current_dir(django_dir())
        .env("LTXFS_DB", db)
        .env("NODE_NAME", node);
    command
}

/// Django's development server, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(python: &Path, db: &Path, node: &str) -> Server {
        let addr = free_loopback_address();
        let child = manage(python, db, node)
            .args(["runserver", "--noreload", &addr.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Django");
        let server = Server { child, addr };
        wait_until("Django to listen", TIMEOUT, || {
            std::net::TcpStream::connect(addr).is_ok()
        });
        server
    }

    fn request(&self, method: &str, body: &str) -> HttpResponse {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("http://{}/items", self.addr);
        runtime
            .block_on(HttpClient::new().request(
                method.parse().unwrap(),
                &url,
                &[],
                Bytes::from(body.to_string()),
                Duration::from_secs(10),
            ))
            .unwrap_or_else(|error| panic!("{method} {url}: {error}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(response: &HttpResponse) -> String {
    String::from_utf8_lossy(&response.body).into_owned()
}

#[test]
fn the_django_example_writes_on_the_primary_and_replays_writes_from_a_replica() {
    let python = python();
    let primary = Mount::start(MountOptions {
        extra_yaml: "lease:\n  type: static\n  candidate: true\n  hostname: node-a\n".to_string(),
        ..MountOptions::default()
    });
    let primary_url = format!("http://{}", primary.listen_addr());
    let replica = Mount::start(MountOptions {
        extra_yaml: format!(
            "lease:\n  type: static\n  candidate: false\n  hostname: node-b\n  advertise-url: {primary_url}\n"
        ),
        ..MountOptions::default()
    });

    // Migrations run on the primary only (as `exec` with `if-candidate` does).
    let migrated = manage(&python, &primary.db_path(DB), "node-a")
        .args(["migrate", "--no-input"])
        .output()
        .unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let on_primary = Server::start(&python, &primary.db_path(DB), "node-a");
    let created = on_primary.request("POST", "hello from django");
    assert_eq!(created.status, 200, "{}", text(&created));
    assert_eq!(text(&created), "created 1 on node-a\n");

    // The replica reads it once replication has brought it.
    let position =
        |mount: &Mount| std::fs::read_to_string(mount.db_path(&format!("{DB}-pos"))).ok();
    wait_until("the replica to catch up", TIMEOUT, || {
        position(&replica).is_some() && position(&replica) == position(&primary)
    });
    let on_replica = Server::start(&python, &replica.db_path(DB), "node-b");
    let listed = on_replica.request("GET", "");
    assert_eq!(listed.status, 200, "{}", text(&listed));
    assert_eq!(text(&listed), "1\thello from django\n");

    // A write on the replica is refused before SQLite sees it, and answered with
    // fly-replay naming the primary.
    let refused = on_replica.request("POST", "lost?");
    assert_eq!(refused.status, 409, "{}", text(&refused));
    assert_eq!(refused.header("fly-replay"), Some("instance=node-a"));
    assert!(
        text(&refused).contains("read replica of node-a"),
        "{}",
        text(&refused)
    );
    assert_eq!(
        text(&on_primary.request("GET", "")),
        "1\thello from django\n"
    );
}
