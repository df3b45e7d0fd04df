//! A real etcd for the lease tests: one `etcd` process per [`Etcd`], on loopback.
//!
//! [`Etcd::start`] runs Debian's `etcd` (package `etcd-server`, which `.ci/run`
//! installs) with a private temporary data dir, a client and a peer port that were
//! free a moment before, and short raft timings (heartbeat 25 ms, election 250 ms),
//! so it is ready in about 0.1 s and grants leases as short as one second (etcd's
//! minimum TTL is 1.5 election timeouts, 2 s with its defaults). It waits, at most
//! [`READY_TIMEOUT`], until the JSON gateway answers, retrying with new ports when
//! another process took one first. Dropping an [`Etcd`] kills the process and
//! removes its data.
//!
//! A machine without `etcd` makes every test that needs one fail with a message
//! saying how to install it (whether or not `CI` is set): they never pass silently.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// How long etcd may take to answer after it starts.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often readiness is checked.
const POLL: Duration = Duration::from_millis(20);
/// How many times a start is retried when etcd exits at once (a port was taken).
const START_ATTEMPTS: usize = 5;
/// The bound on one HTTP exchange with etcd from the tests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Spawns etcd with its data in `dir`, listening on `url` for clients and
/// `peer_url` for peers, logging (appending) to `log`.
fn spawn(dir: &Path, url: &str, peer_url: &str, log: &Path) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open etcd's log");
    Command::new("etcd")
        .arg("--name=test")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={url}"))
        .arg(format!("--advertise-client-urls={url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=test={peer_url}"))
        .arg("--heartbeat-interval=25")
        .arg("--election-timeout=250")
        .arg("--logger=zap")
        .arg("--log-level=warn")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("clone etcd's log"))
        .stderr(log_file)
        .spawn()
        .expect("spawn etcd")
}

/// A running etcd, killed on drop.
pub struct Etcd {
    /// The etcd process.
    child: Child,
    /// Its client URL, `http://127.0.0.1:<port>`.
    url: String,
    /// Its client address.
    address: SocketAddr,
    /// Its peer address.
    #[allow(dead_code)] // read by `restart`
    peer: SocketAddr,
    /// Where its log goes.
    log: PathBuf,
    /// Its data dir and log, removed on drop (after the process is gone).
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts an etcd and waits until it answers; panics with its log otherwise.
    pub fn start() -> Etcd {
        require_etcd();
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Etcd::try_start() {
                Ok(etcd) => return etcd,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "etcd did not start in {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n---\n")
        );
    }

    /// One attempt: `Err` with the log when etcd exited before answering.
    fn try_start() -> Result<Etcd, String> {
        let dir = tempfile::Builder::new()
            .prefix("ltxfs-etcd-")
            .tempdir()
            .expect("create a temporary dir for etcd");
        let client = free_loopback_address();
        let peer = free_loopback_address();
        let url = format!("http://{client}");
        let peer_url = format!("http://{peer}");
        let log = dir.path().join("etcd.log");
        let child = spawn(dir.path(), &url, &peer_url, &log);
        let mut etcd = Etcd {
            child,
            url,
            address: client,
            peer,
            log,
            _dir: dir,
        };
        etcd.wait_ready()?;
        Ok(etcd)
    }

    /// Stops etcd (SIGKILL), waits `down`, and starts it again on the same
    /// data dir and addresses; waits until it answers.
    #[allow(dead_code)] // used by tests/chaos.rs only
    pub fn restart(&mut self, down: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        thread::sleep(down);
        let peer_url = format!("http://{}", self.peer);
        self.child = spawn(self._dir.path(), &self.url, &peer_url, &self.log);
        if let Err(log) = self.wait_ready() {
            panic!("etcd did not start again: {log}");
        }
    }

    /// Waits until etcd answers: `Err` with its log when it exited first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let etcd = self;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = etcd.child.try_wait().expect("check on etcd") {
                return Err(format!("etcd exited with {status}:\n{}", etcd.log_text()));
            }
            if matches!(etcd.post("/v3/kv/range", r#"{"key":"AA=="}"#), Ok(200)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd did not answer within {READY_TIMEOUT:?}:\n{}",
                    etcd.log_text()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The client URL, for `lease.etcd.endpoints`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stores `value` under `key` directly, bypassing the lease code.
    pub fn put(&self, key: &str, value: &[u8]) {
        let body = format!(
            r#"{{"key":"{}","value":"{}"}}"#,
            BASE64.encode(key),
            BASE64.encode(value)
        );
        match self.post("/v3/kv/put", &body) {
            Ok(200) => {}
            other => panic!("putting {key:?} into etcd failed: {other:?}"),
        }
    }

    /// Compacts etcd's history up to `revision`: older revisions can no longer be
    /// watched.
    pub fn compact(&self, revision: u64) {
        let body = format!(r#"{{"revision":"{revision}","physical":true}}"#);
        match self.post("/v3/kv/compaction", &body) {
            Ok(200) => {}
            other => panic!("compacting etcd to revision {revision} failed: {other:?}"),
        }
    }

    /// POSTs `body` to `path` with a one-shot HTTP/1.1 connection and returns the
    /// status code.
    fn post(&self, path: &str, body: &str) -> io::Result<u16> {
        let mut stream = TcpStream::connect_timeout(&self.address, HTTP_TIMEOUT)?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
        stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.address,
            body.len()
        )?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer);
        answer
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::other(format!("not an HTTP answer: {answer:?}")))
    }

    /// etcd's log so far.
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|error| format!("(no log: {error})"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Panics with installation advice when `etcd` cannot be run.
fn require_etcd() {
    match Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => {}
        outcome => {
            let ci = std::env::var_os("CI").is_some();
            panic!(
                "the etcd lease tests need a real etcd, but `etcd --version` gave {outcome:?}. \
                 Install Debian's etcd-server (`apt-get install etcd-server`; .ci/run does). {}",
                if ci {
                    "CI is set: the CI machine must provide etcd."
                } else {
                    "Refusing to pass silently."
                }
            );
        }
    }
}

/// A loopback address whose port was free a moment ago.
pub fn free_loopback_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free loopback port")
}
