//! A private etcd on loopback, for the nodes' lease.
//!
//! [`Etcd::start_in`] runs `etcd` (Debian's `etcd-server`, which `.ci/run`
//! installs) with its data in `<dir>/etcd-data` and its output in
//! `<dir>/etcd.log`, on a client and a peer port that were free a moment
//! before, with short raft timings (heartbeat 25 ms, election 250 ms): it is
//! ready in about 0.1 s and grants leases as short as 1.5 election timeouts (2 s
//! with etcd's defaults). It waits until `GET /health` says it is healthy, and
//! starts it again on new ports when it exits at once (another process took a
//! port). Dropping an [`Etcd`] kills the process; it also ends with the thread
//! that started it ([`crate::exit_with_parent`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{exit_with_parent, free_loopback_addresses, http};

/// How long etcd may take to become healthy after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often its health is checked meanwhile.
const POLL: Duration = Duration::from_millis(20);
/// How many times etcd is started on new ports when it exits at once.
const START_ATTEMPTS: usize = 5;
/// How much of the end of etcd's log goes into errors.
const LOG_TAIL_CHARS: usize = 2000;

/// Why etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// There is no `etcd` executable to run.
    #[error("`etcd` is not on PATH (Debian: `apt-get install etcd-server`)")]
    NotInstalled,
    /// A file, a port or the process could not be had.
    #[error("could not {action} {}: {cause}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// What the operating system said.
        cause: io::Error,
    },
    /// etcd exited at once on every attempt, or did not become healthy in time.
    #[error("etcd did not become ready ({problem}); see {}; it said: {output}", log.display())]
    NotReady {
        /// What went wrong.
        problem: String,
        /// etcd's log.
        log: PathBuf,
        /// The end of etcd's log.
        output: String,
    },
}

/// A running etcd, killed on drop.
pub struct Etcd {
    child: Child,
    /// Its client URL, `http://127.0.0.1:<port>`.
    url: String,
    address: SocketAddr,
    peer: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    /// The directory of [`Etcd::start`], removed on drop after the process.
    _private_dir: Option<tempfile::TempDir>,
}

impl Etcd {
    /// Starts an etcd in a temporary directory of its own, removed on drop.
    pub fn start() -> Result<Etcd, EtcdError> {
        let dir = tempfile::Builder::new()
            .prefix("ltxfs-etcd-")
            .tempdir()
            .map_err(|cause| EtcdError::Io {
                action: "create a temporary directory for etcd in",
                path: std::env::temp_dir(),
                cause,
            })?;
        let mut etcd = Etcd::start_in(dir.path())?;
        etcd._private_dir = Some(dir);
        Ok(etcd)
    }

    /// Starts an etcd with its data and log in `dir`, and waits until it is
    /// healthy.
    pub fn start_in(dir: &Path) -> Result<Etcd, EtcdError> {
        let log = dir.join("etcd.log");
        let mut problem = String::new();
        for _ in 0..START_ATTEMPTS {
            match Etcd::try_start(dir, &log)? {
                Ok(etcd) => return Ok(etcd),
                Err(attempt) => problem = attempt,
            }
        }
        Err(not_ready(
            format!("{problem}, on each of {START_ATTEMPTS} attempts"),
            &log,
        ))
    }

    /// One attempt: the outer error is final, the inner one says why this
    /// attempt failed in a way another may not.
    fn try_start(dir: &Path, log: &Path) -> Result<Result<Etcd, String>, EtcdError> {
        let data = dir.join("etcd-data");
        // Data left by an earlier attempt names other ports.
        match std::fs::remove_dir_all(&data) {
            Err(cause) if cause.kind() != io::ErrorKind::NotFound => {
                return Err(EtcdError::Io {
                    action: "remove etcd's old data",
                    path: data,
                    cause,
                });
            }
            _ => {}
        }
        let [address, peer] = free_loopback_addresses().map_err(|cause| EtcdError::Io {
            action: "find free loopback ports for etcd in",
            path: dir.to_path_buf(),
            cause,
        })?;
        let output = File::create(log).map_err(|cause| log_error(log, cause))?;
        let mut etcd = Etcd {
            child: spawn(&data, address, peer, output, log)?,
            url: format!("http://{address}"),
            address,
            peer,
            data,
            log: log.to_path_buf(),
            _private_dir: None,
        };
        // From here on, an early return drops the `Etcd`, which kills the process.
        Ok(etcd.wait_ready()?.map(|()| etcd))
    }

    /// Kills etcd, waits `down`, and starts it again on the same data and
    /// ports; waits until it is healthy.
    pub fn restart(&mut self, down: Duration) -> Result<(), EtcdError> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down);
        let output = OpenOptions::new()
            .append(true)
            .open(&self.log)
            .map_err(|cause| log_error(&self.log, cause))?;
        self.child = spawn(&self.data, self.address, self.peer, output, &self.log)?;
        self.wait_ready()?
            .map_err(|problem| not_ready(problem, &self.log))
    }

    /// Waits until etcd is healthy: the inner error when it exited first.
    fn wait_ready(&mut self) -> Result<Result<(), String>, EtcdError> {
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(Err(format!("etcd exited with {status}"))),
                Ok(None) => {}
                Err(cause) => {
                    return Err(EtcdError::Io {
                        action: "check on the etcd process writing to",
                        path: self.log.clone(),
                        cause,
                    });
                }
            }
            if http::request(self.address, "GET", "/health", &[], "")
                .is_ok_and(|answer| answer.status == 200 && healthy(&answer.body))
            {
                return Ok(Ok(()));
            }
            if started.elapsed() >= READY_TIMEOUT {
                return Err(not_ready(
                    format!("not healthy within {} s", READY_TIMEOUT.as_secs()),
                    &self.log,
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// The client URL, `http://127.0.0.1:<port>`, for `lease.etcd.endpoints`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The client address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Its data is its user's alone: nothing to shut down cleanly.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns etcd with its data in `data`, serving clients on `address` and
/// peers on `peer`, writing to `output`.
fn spawn(
    data: &Path,
    address: SocketAddr,
    peer: SocketAddr,
    output: File,
    log: &Path,
) -> Result<Child, EtcdError> {
    let url = format!("http://{address}");
    let peer_url = format!("http://{peer}");
    let stderr = output.try_clone().map_err(|cause| log_error(log, cause))?;
    let mut command = Command::new("etcd");
    exit_with_parent(&mut command);
    command
        .arg("--name=etcd")
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={url}"))
        .arg(format!("--advertise-client-urls={url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=etcd={peer_url}"))
        .arg("--heartbeat-interval=25")
        .arg("--election-timeout=250")
        .arg("--logger=zap")
        .arg("--log-level=warn")
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(stderr)
        .spawn()
        .map_err(|cause| match cause.kind() {
            io::ErrorKind::NotFound => EtcdError::NotInstalled,
            _ => EtcdError::Io {
                action: "start etcd, logging to",
                path: log.to_path_buf(),
                cause,
            },
        })
}

fn log_error(log: &Path, cause: io::Error) -> EtcdError {
    EtcdError::Io {
        action: "open etcd's log",
        path: log.to_path_buf(),
        cause,
    }
}

fn not_ready(problem: String, log: &Path) -> EtcdError {
    EtcdError::NotReady {
        problem,
        log: log.to_path_buf(),
        output: log_tail(log),
    }
}

/// Whether the body of etcd's `GET /health` says it is healthy.
fn healthy(body: &str) -> bool {
    let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    compact.contains("\"health\":\"true\"")
}

/// The end of a log file, for errors.
fn log_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Err(error) => format!("(could not read {}: {error})", path.display()),
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim();
            let skip = text.chars().count().saturating_sub(LOG_TAIL_CHARS);
            match text.chars().skip(skip).collect::<String>() {
                tail if tail.is_empty() => "(nothing)".to_string(),
                tail => tail,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_true() {
        assert!(healthy(r#"{"health":"true","reason":""}"#));
        assert!(healthy(r#"{"health": "true"}"#));
        assert!(!healthy(r#"{"health":"false","reason":"RAFT NO LEADER"}"#));
        assert!(!healthy(""));
    }
}
