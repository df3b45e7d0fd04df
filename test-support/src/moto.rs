//! A private moto S3 server on loopback, for the backup tests and
//! `ltxfs bench backup`.
//!
//! [`Moto::start_in`] runs moto's server mode (`moto_server`, from the PyPI
//! package `moto[server]`, which `.ci/run` installs into `target/s3-venv`, or
//! the executable `LTXFS_MOTO_SERVER` names) on a loopback port that was free a
//! moment before, its output going to `<dir>/moto.log`. It is ready once it
//! answers S3's `ListBuckets` (`GET /`), and is started again on another port
//! when it exits at once (another process took the port). moto keeps its data
//! in memory, checks no signatures, and takes path-style URLs
//! (`<endpoint>/<bucket>/<key>`).
//!
//! Invariants: dropping a [`Moto`] kills (paused or not) and reaps the process;
//! it also ends with the thread that started it ([`crate::exit_with_parent`]).

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{exit_with_parent, free_loopback_addresses, http};

/// Where `.ci/run` installs moto's server, relative to the workspace's root.
const MOTO_SERVER: &str = "target/s3-venv/bin/moto_server";
/// How many times moto is started on a new port when it exits at once.
const START_ATTEMPTS: usize = 5;
/// How long moto may take to answer after it starts (importing moto takes a
/// second or two on an idle machine, more while tests compile and run).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is checked.
const POLL: Duration = Duration::from_millis(50);

/// Why moto could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    /// There is no moto server to run.
    #[error(
        "moto_server not found at {}: run `bash .ci/run` (it installs moto[server] into \
         target/s3-venv), or set LTXFS_MOTO_SERVER to a moto_server executable",
        path.display()
    )]
    NotInstalled {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A file, a port, the process or a signal could not be had.
    #[error("could not {action} {}: {cause}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file concerned (moto's log, or its executable).
        path: PathBuf,
        /// What the operating system said.
        cause: io::Error,
    },
    /// moto exited at once on every attempt, or did not answer in time.
    #[error("moto did not become ready ({problem}); see {}", log.display())]
    NotReady {
        /// What went wrong.
        problem: String,
        /// moto's log.
        log: PathBuf,
    },
    /// A request to moto failed or was refused.
    #[error("S3 request {request} failed: {problem}")]
    Request {
        /// The method and path.
        request: String,
        /// What went wrong.
        problem: String,
    },
}

/// A running moto server, killed on drop.
pub struct Moto {
    child: Child,
    address: SocketAddr,
    log: PathBuf,
}

impl Moto {
    /// A SigV4 `Authorization` header moto accepts (it checks none of it, but
    /// refuses some requests without one).
    pub const AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
        Credential=testing/20000101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";

    /// Starts moto with its log in `<dir>/moto.log` and waits until it answers.
    pub fn start_in(dir: &Path) -> Result<Moto, MotoError> {
        let binary = moto_binary()?;
        let log = dir.join("moto.log");
        let mut problem = String::new();
        for _ in 0..START_ATTEMPTS {
            match Moto::try_start(&binary, &log)? {
                Ok(moto) => return Ok(moto),
                Err(attempt) => problem = attempt,
            }
        }
        Err(MotoError::NotReady {
            problem: format!("{problem}, on each of {START_ATTEMPTS} attempts"),
            log,
        })
    }

    /// One attempt: the outer error is final, the inner one says why this
    /// attempt failed in a way another may not.
    fn try_start(binary: &Path, log: &Path) -> Result<Result<Moto, String>, MotoError> {
        let io_error = |action| {
            let path = log.to_path_buf();
            move |cause| MotoError::Io {
                action,
                path,
                cause,
            }
        };
        let [address] = free_loopback_addresses()
            .map_err(io_error("find a free loopback port for moto, logging to"))?;
        let stdout = File::create(log).map_err(io_error("create the log file"))?;
        let stderr = stdout
            .try_clone()
            .map_err(io_error("create the log file"))?;
        let mut command = Command::new(binary);
        exit_with_parent(&mut command);
        let child = command
            .arg("-H")
            .arg(address.ip().to_string())
            .arg("-p")
            .arg(address.port().to_string())
            // So that the log is complete when a test fails with it.
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|cause| MotoError::Io {
                action: "run",
                path: binary.to_path_buf(),
                cause,
            })?;
        // From here on, an early return drops the `Moto`, which kills the process.
        let mut moto = Moto {
            child,
            address,
            log: log.to_path_buf(),
        };
        let started = Instant::now();
        loop {
            match moto.child.try_wait() {
                Ok(Some(status)) => return Ok(Err(format!("moto_server exited with {status}"))),
                Ok(None) => {}
                Err(cause) => return Err(io_error("check on moto, logging to")(cause)),
            }
            if moto.ready() {
                return Ok(Ok(moto));
            }
            if started.elapsed() >= READY_TIMEOUT {
                return Err(MotoError::NotReady {
                    problem: format!("no answer to GET / within {} s", READY_TIMEOUT.as_secs()),
                    log: log.to_path_buf(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether moto answers `ListBuckets` (the body tells moto from another
    /// server that took the port).
    fn ready(&self) -> bool {
        http::request(self.address, "GET", "/", &[], "").is_ok_and(|answer| {
            answer.status == 200 && answer.body.contains("ListAllMyBucketsResult")
        })
    }

    /// The address it serves on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The endpoint, `http://127.0.0.1:<port>`, for the S3 client's endpoint
    /// setting.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The process id, to measure its CPU time.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|error| format!("(no log: {error})"))
    }

    /// Creates the bucket `name` (3 to 63 lowercase letters, digits, dots and
    /// hyphens, as in S3).
    pub fn create_bucket(&self, name: &str) -> Result<(), MotoError> {
        let path = format!("/{name}");
        let failed = |problem: String| MotoError::Request {
            request: format!("PUT {path}"),
            problem,
        };
        let answer = http::request(
            self.address,
            "PUT",
            &path,
            &[("Authorization", Moto::AUTHORIZATION)],
            "",
        )
        .map_err(|error| failed(error.to_string()))?;
        if answer.status == 200 {
            Ok(())
        } else {
            Err(failed(format!("status {}: {}", answer.status, answer.body)))
        }
    }

    /// Stops the server (`SIGSTOP`) until [`Moto::resume`]: the kernel still
    /// accepts connections on its port, but nothing answers them, as with a
    /// destination that hangs.
    pub fn pause(&self) -> Result<(), MotoError> {
        self.signal(libc::SIGSTOP)
    }

    /// Lets a paused server carry on (`SIGCONT`), with its data intact,
    /// answering what it was sent meanwhile.
    pub fn resume(&self) -> Result<(), MotoError> {
        self.signal(libc::SIGCONT)
    }

    fn signal(&self, signal: libc::c_int) -> Result<(), MotoError> {
        let failed = |cause| MotoError::Io {
            action: "signal moto, logging to",
            path: self.log.clone(),
            cause,
        };
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|_| failed(io::Error::from_raw_os_error(libc::ESRCH)))?;
        // SAFETY: kill(2) only sends a signal; the pid is our own child's, which
        // has not been waited for (that happens on drop), so it was not reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(failed(io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; its data is its user's alone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto's server: `LTXFS_MOTO_SERVER` if set, else where `.ci/run` installs it
/// in this checkout.
fn moto_binary() -> Result<PathBuf, MotoError> {
    let path = std::env::var_os("LTXFS_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // This crate is `test-support/` in the workspace.
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
            workspace.unwrap_or(Path::new("/")).join(MOTO_SERVER)
        });
    if path.is_file() {
        Ok(path)
    } else {
        Err(MotoError::NotInstalled { path })
    }
}
