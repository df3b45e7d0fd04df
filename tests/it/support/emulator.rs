//! What the object-storage emulators of the backup tests (`s3`, `gcs`, `azure`)
//! share: starting a server process, and talking HTTP to it.
//!
//! [`Emulator::start`] runs a [`Program`] on a loopback port that was free a
//! moment before, its output going to a log in a private temporary dir (which
//! the program's arguments may also use). It waits, at most [`READY_TIMEOUT`],
//! until the program's readiness check passes, retrying with a new port (up to
//! [`START_ATTEMPTS`] times) when the process exits first, as it does when
//! another process took its port. Dropping an [`Emulator`] kills the process
//! (paused or not), reaps it and removes its dir.
//!
//! A machine without the program's binary makes every test that needs it fail
//! with a message saying how to install it (whether or not `CI` is set): they
//! never pass silently.
//!
//! [`request`] sends one request with a one-shot HTTP/1.1 connection, for the
//! readiness checks and for what the tests set up through an emulator's API.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long an emulator may take to answer after it starts (importing moto or
/// loading Azurite takes a second or two on an idle machine, more while the
/// tests compile and run; fake-gcs-server well under a second).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is checked.
const POLL: Duration = Duration::from_millis(50);
/// How many times a start is retried when the process exits at once (its port
/// was taken).
const START_ATTEMPTS: usize = 5;
/// The bound on one HTTP exchange with an emulator from the tests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// An emulator's server program and how to run it.
pub struct Program {
    /// Its name in messages.
    pub name: &'static str,
    /// Where `.ci/run` installs its binary, relative to the crate's root.
    pub binary: &'static str,
    /// What `.ci/run` does to install it, for the message when it is missing.
    pub installed_by: &'static str,
    /// The prefix of its temporary dir's name.
    pub dir_prefix: &'static str,
    /// The name of its log in that dir.
    pub log_name: &'static str,
    /// Its arguments, given the address to serve on and its temporary dir
    /// (where this may create what the arguments name).
    pub args: fn(SocketAddr, &Path) -> Vec<OsString>,
    /// Environment variables set on it.
    pub env: &'static [(&'static str, &'static str)],
    /// Whether the server at the address answers, and is this program (not
    /// another that took the port).
    pub ready: fn(SocketAddr) -> bool,
}

/// A running emulator, killed on drop.
pub struct Emulator {
    /// The server process.
    child: Child,
    /// Its address.
    address: SocketAddr,
    /// Its name, for messages.
    name: &'static str,
    /// Where its output goes.
    log: PathBuf,
    /// Its dir (its log and what its arguments name), removed on drop (after
    /// the process is gone).
    dir: tempfile::TempDir,
}

impl Emulator {
    /// Starts `program` and waits until it is ready; panics with its log
    /// otherwise.
    pub fn start(program: &Program) -> Emulator {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join(program.binary);
        require(program, &binary);
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Emulator::try_start(program, &binary) {
                Ok(emulator) => return emulator,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "{} did not start in {START_ATTEMPTS} attempts:\n{}",
            program.name,
            failures.join("\n---\n")
        );
    }

    /// One attempt: `Err` with the log when the process exited before it was
    /// ready.
    fn try_start(program: &Program, binary: &Path) -> Result<Emulator, String> {
        let name = program.name;
        let dir = tempfile::Builder::new()
            .prefix(program.dir_prefix)
            .tempdir()
            .unwrap_or_else(|error| panic!("create a temporary dir for {name}: {error}"));
        let address = free_loopback_address();
        let log = dir.path().join(program.log_name);
        let log_file =
            File::create(&log).unwrap_or_else(|error| panic!("create {name}'s log: {error}"));
        let stdout = log_file
            .try_clone()
            .unwrap_or_else(|error| panic!("clone {name}'s log: {error}"));
        let child = Command::new(binary)
            .args((program.args)(address, dir.path()))
            .envs(program.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", binary.display()));
        let mut emulator = Emulator {
            child,
            address,
            name,
            log,
            dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = emulator
                .child
                .try_wait()
                .unwrap_or_else(|error| panic!("check on {name}: {error}"));
            if let Some(status) = exited {
                return Err(format!("{name} exited with {status}:\n{}", emulator.log()));
            }
            if (program.ready)(address) {
                return Ok(emulator);
            }
            if Instant::now() > deadline {
                panic!(
                    "{name} did not answer within {READY_TIMEOUT:?}:\n{}",
                    emulator.log()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The address it serves on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Its temporary dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its log so far, for panic messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|error| format!("(no log: {error})"))
    }

    /// Sends `signal` (called `signal_name` in messages) to the process.
    pub fn signal(&self, signal: libc::c_int, signal_name: &str) {
        let name = self.name;
        let pid = libc::pid_t::try_from(self.child.id())
            .unwrap_or_else(|_| panic!("{name}'s pid fits pid_t"));
        // SAFETY: kill(2) only sends a signal; the pid is our own child's, which
        // has not been waited for (that happens on drop), so it was not reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            panic!(
                "sending {signal_name} to {name} ({pid}) failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer, as text.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The status line and the headers.
    pub head: String,
    /// The rest of the bytes after the head (the answers read here are
    /// `Connection: close` and small, so not chunked).
    pub body: String,
}

impl Answer {
    /// Parses a whole answer.
    pub fn parse(answer: &[u8]) -> io::Result<Answer> {
        let head_end = answer
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .ok_or_else(|| io::Error::other("an HTTP answer with no end of head"))?;
        let head = String::from_utf8_lossy(&answer[..head_end]).into_owned();
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| head.strip_prefix("HTTP/1.0 "))
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::other(format!("not an HTTP answer: {head:?}")))?;
        Ok(Answer {
            status,
            head,
            body: String::from_utf8_lossy(&answer[head_end + 4..]).into_owned(),
        })
    }

    /// The value of the header `name` (case-insensitive), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .find(|(header, _)| header.trim().eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim())
    }
}

/// Sends `method path` with `headers` and `body` (after a `Content-Length`,
/// empty or not) to `address` with a one-shot HTTP/1.1 connection, and returns
/// the answer.
pub fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> io::Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&address, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Answer::parse(&answer)
}

/// Panics with installation advice when `binary`, the path of `program`'s, is
/// missing.
fn require(program: &Program, binary: &Path) {
    if binary.is_file() {
        return;
    }
    let name = program.name;
    let ci = std::env::var_os("CI").is_some();
    panic!(
        "{name} not found at {}: run `bash .ci/run` ({}). {}",
        binary.display(),
        program.installed_by,
        if ci {
            format!("CI is set: the CI machine must provide {name}.")
        } else {
            "Refusing to pass silently.".to_owned()
        }
    );
}

/// A loopback address whose port was free a moment ago.
fn free_loopback_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free loopback port")
}
