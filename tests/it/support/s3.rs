//! A real S3 server for the replication-to-S3 tests: one moto server per
//! [`S3Server`], on loopback.
//!
//! [`S3Server::start`] runs moto's server mode (`moto_server`, from the PyPI
//! package `moto[server]`, which `.ci/run` installs into `target/s3-venv`) as an
//! [`Emulator`]: on a free loopback port, logging to a private temporary dir,
//! restarted on another port when its port was taken, and ready once it answers
//! S3's `ListBuckets` (`GET /`). moto keeps everything in memory and checks no
//! signatures: any credentials do. Requests use path-style URLs
//! (`<endpoint>/<bucket>/<key>`). Dropping an [`S3Server`] kills the process
//! (paused or not) and removes its log.
//!
//! [`S3Server::pause`] stops the process with `SIGSTOP`: the kernel still accepts
//! connections on its port, but nothing answers them, as with a destination that
//! hangs; [`S3Server::resume`] lets it carry on, with its data intact.
//!
//! A machine without `target/s3-venv/bin/moto_server` makes every test that needs
//! one fail with a message saying how to install it (whether or not `CI` is set):
//! they never pass silently.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;

use crate::support::emulator::{Emulator, Program};
use test_support::http::request;

/// moto's server, where `.ci/run` installs it.
const MOTO_SERVER: Program = Program {
    name: "moto_server",
    binary: "target/s3-venv/bin/moto_server",
    installed_by: "it installs moto[server] into target/s3-venv",
    dir_prefix: "ltxfs-s3-",
    log_name: "moto.log",
    args: moto_args,
    // So that the log is complete when a test panics with it.
    env: &[("PYTHONUNBUFFERED", "1")],
    ready: moto_ready,
};

/// A running moto S3 server, killed on drop.
pub struct S3Server {
    /// The moto_server process.
    emulator: Emulator,
    /// Its endpoint, `http://127.0.0.1:<port>`.
    endpoint: String,
}

impl S3Server {
    /// Starts a moto server and waits until it answers; panics with its log
    /// otherwise.
    pub fn start() -> S3Server {
        let emulator = Emulator::start(&MOTO_SERVER);
        S3Server {
            endpoint: format!("http://{}", emulator.address()),
            emulator,
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
        match request(self.emulator.address(), "PUT", &format!("/{name}"), &[], "") {
            Ok(answer) if answer.status == 200 => {}
            other => panic!(
                "creating the bucket {name:?} in moto failed: {other:?}\n{}",
                self.log()
            ),
        }
    }

    /// Stops the server (`SIGSTOP`) until [`S3Server::resume`]: connections are
    /// still accepted but get no answer.
    pub fn pause(&self) {
        self.emulator.signal(libc::SIGSTOP, "SIGSTOP");
    }

    /// Lets a paused server carry on (`SIGCONT`), answering what it was sent
    /// meanwhile.
    pub fn resume(&self) {
        self.emulator.signal(libc::SIGCONT, "SIGCONT");
    }

    /// The server's log so far, for panic messages.
    pub fn log(&self) -> String {
        self.emulator.log()
    }
}

/// moto_server's arguments: its host and port.
fn moto_args(address: SocketAddr, _dir: &Path) -> Vec<OsString> {
    vec![
        "-H".into(),
        address.ip().to_string().into(),
        "-p".into(),
        address.port().to_string().into(),
    ]
}

/// Whether moto answers `ListBuckets`.
fn moto_ready(address: SocketAddr) -> bool {
    // The body tells moto from another server that took the port.
    request(address, "GET", "/", &[], "")
        .is_ok_and(|answer| answer.status == 200 && answer.body.contains("ListAllMyBucketsResult"))
}
