//! What the object-storage emulators of the backup tests (`gcs`, `azure`)
//! share: starting a server process, and talking HTTP to it.
//!
//! [`Emulator::start`] runs a [`Program`] on a loopback port that was free a
//! moment before, its output going to a log in a private temporary dir (which
//! the program's arguments may also use). It waits, at most [`READY_TIMEOUT`],
//! until the program's readiness check passes, retrying with a new port (up to
//! [`START_ATTEMPTS`] times) when the process exits first, as it does when
//! another process took its port. Dropping an [`Emulator`] kills the process,
//! reaps it and removes its dir.
//!
//! A machine without the program's binary makes every test that needs it fail
//! with a message saying how to install it (whether or not `CI` is set): they
//! never pass silently.
//!

use std::ffi::OsString;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long an emulator may take to answer after it starts (loading Azurite
/// takes a second or two on an idle machine, more while the
/// tests compile and run; fake-gcs-server well under a second).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is checked.
const POLL: Duration = Duration::from_millis(50);
/// How many times a start is retried when the process exits at once (its port
/// was taken).
const START_ATTEMPTS: usize = 5;

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
        let address = crate::common::free_loopback_address();
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
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
