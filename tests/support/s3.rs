//! A real S3 server for the replication-to-S3 tests: one moto server per
//! [`S3Server`], on loopback.
//!
//! [`S3Server::start`] runs moto's server mode (`moto_server`, from the PyPI
//! package `moto[server]`, which `.ci/run` installs into `target/s3-venv`) on a
//! loopback port that was free a moment before, its output going to a log in a
//! private temporary dir. It waits, at most [`READY_TIMEOUT`], until the server
//! answers S3's `ListBuckets` (`GET /`), retrying with a new port when another
//! process took it first. moto keeps everything in memory and checks no
//! signatures: any credentials do, and [`credentials`] gives the ones the tests
//! set on the processes they start. Requests use path-style URLs
//! (`<endpoint>/<bucket>/<key>`). Dropping an [`S3Server`] kills the process
//! (paused or not) and removes its log.
//!
//! [`S3Server::pause`] stops the process with `SIGSTOP`: the kernel still accepts
//! connections on its port, but nothing answers them, as with a destination that
//! hangs; [`S3Server::resume`] lets it carry on, with its data intact.
//!
//! A machine without `target/s3-venv/bin/moto_server` makes every test that needs
//! one fail with a message saying how to install it (whether or not `CI` is set):
//! they never pass silently. Tests that use only part of this module include it
//! with `#[allow(dead_code)]`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long moto may take to answer after it starts (importing moto takes a
/// second or two on an idle machine, more while the tests compile and run).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is checked.
const POLL: Duration = Duration::from_millis(50);
/// How many times a start is retried when moto exits at once (its port was taken).
const START_ATTEMPTS: usize = 5;
/// The bound on one HTTP exchange with moto from the tests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Where `.ci/run` installs moto's server, relative to the crate's root.
const MOTO_SERVER: &str = "target/s3-venv/bin/moto_server";

/// A running moto S3 server, killed on drop.
pub struct S3Server {
    /// The moto_server process.
    child: Child,
    /// Its address.
    address: SocketAddr,
    /// Its endpoint, `http://127.0.0.1:<port>`.
    endpoint: String,
    /// Where its output goes.
    log: PathBuf,
    /// The dir of its log, removed on drop (after the process is gone).
    _dir: tempfile::TempDir,
}

impl S3Server {
    /// Starts a moto server and waits until it answers; panics with its log
    /// otherwise.
    pub fn start() -> S3Server {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join(MOTO_SERVER);
        require_moto(&binary);
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match S3Server::try_start(&binary) {
                Ok(server) => return server,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "moto_server did not start in {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n---\n")
        );
    }

    /// One attempt: `Err` with the log when moto exited before answering.
    fn try_start(binary: &Path) -> Result<S3Server, String> {
        let dir = tempfile::Builder::new()
            .prefix("ltxfs-s3-")
            .tempdir()
            .expect("create a temporary dir for moto_server");
        let address = free_loopback_address();
        let log = dir.path().join("moto.log");
        let log_file = File::create(&log).expect("create moto_server's log");
        let child = Command::new(binary)
            .arg("-H")
            .arg(address.ip().to_string())
            .arg("-p")
            .arg(address.port().to_string())
            // So that the log is complete when a test panics with it.
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone moto_server's log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", binary.display()));
        let mut server = S3Server {
            child,
            address,
            endpoint: format!("http://{address}"),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait().expect("check on moto_server") {
                return Err(format!(
                    "moto_server exited with {status}:\n{}",
                    server.log()
                ));
            }
            // The body tells moto from another server that took the port.
            if let Ok((200, body)) = server.request("GET", "/")
                && body.contains("ListAllMyBucketsResult")
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                panic!(
                    "moto_server did not answer within {READY_TIMEOUT:?}:\n{}",
                    server.log()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The endpoint, `http://127.0.0.1:<port>`, for the S3 client's endpoint
    /// setting.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Creates the bucket `name` (3 to 63 lowercase letters, digits, dots and
    /// hyphens, as in S3); panics when moto refuses.
    pub fn create_bucket(&self, name: &str) {
        match self.request("PUT", &format!("/{name}")) {
            Ok((200, _)) => {}
            other => panic!(
                "creating the bucket {name:?} in moto failed: {other:?}\n{}",
                self.log()
            ),
        }
    }

    /// Stops the server (`SIGSTOP`) until [`S3Server::resume`]: connections are
    /// still accepted but get no answer.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP, "SIGSTOP");
    }

    /// Lets a paused server carry on (`SIGCONT`), answering what it was sent
    /// meanwhile.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT, "SIGCONT");
    }

    /// The server's log so far, for panic messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|error| format!("(no log: {error})"))
    }

    /// Sends `signal` to the server's process.
    fn signal(&self, signal: libc::c_int, name: &str) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("moto_server's pid fits pid_t");
        // SAFETY: kill(2) only sends a signal; the pid is our own child's, which
        // has not been waited for (that happens on drop), so it was not reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            panic!(
                "sending {name} to moto_server ({pid}) failed: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// Sends a bodiless, unsigned request with a one-shot HTTP/1.1 connection and
    /// returns the status code and the body.
    fn request(&self, method: &str, path: &str) -> io::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&self.address, HTTP_TIMEOUT)?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
        stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.address
        )?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer);
        let status = answer
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| answer.strip_prefix("HTTP/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::other(format!("not an HTTP answer: {answer:?}")))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map_or("", |(_, body)| body)
            .to_owned();
        Ok((status, body))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The environment the tests set on the processes that talk to an
/// [`S3Server`]: moto accepts any credentials, but the S3 client wants some.
pub fn credentials() -> [(&'static str, &'static str); 3] {
    [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ]
}

/// Panics with installation advice when `binary` is missing.
fn require_moto(binary: &Path) {
    if binary.is_file() {
        return;
    }
    let ci = std::env::var_os("CI").is_some();
    panic!(
        "moto_server not found at {}: run `bash .ci/run` (it installs moto[server] into \
         target/s3-venv). {}",
        binary.display(),
        if ci {
            "CI is set: the CI machine must provide moto_server."
        } else {
            "Refusing to pass silently."
        }
    );
}

/// A loopback address whose port was free a moment ago.
fn free_loopback_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free loopback port")
}
