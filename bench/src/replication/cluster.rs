//! The nodes of the replication benchmarks: `ltxfs mount` processes on loopback,
//! and what the benchmarks read from them. `ltxfs bench replication` uses the
//! static lease ([`Node::start_primary`], [`Node::start_replica`]); `ltxfs bench
//! handoff` passes a lease section of its own to [`Node::start`].
//!
//! Every node is started with `http.addr: 127.0.0.1:0`, so the kernel picks its
//! port; the benchmark learns the address from the node's log line
//! `serving replication address=...` ([`Node::wait_for_url`]) and, with the
//! static lease, names the primary's in each replica's `lease.advertise-url`.
//!
//! Invariants: a [`Node`] owns its [`MountGuard`], so dropping it stops the
//! process and removes the mount; every wait here has a timeout.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::ReplicationBenchError;
use crate::BenchError;
use crate::cpu::Process;
use crate::mount::MountGuard;
use test_support::yaml_quote;

/// How long a node may take to log its replication address once mounted.
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a starting node's log is read while waiting for its address.
const LOG_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How often positions are read while waiting for a replica; short, because the
/// snapshot figure includes up to one interval.
const POSITION_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// What the primary logs when its replication server listens.
const SERVING_LINE: &str = "serving replication";

/// One running `ltxfs mount` process of the cluster.
pub(crate) struct Node {
    name: String,
    mount: MountGuard,
}

impl Node {
    /// Starts a node named `name` under `base` with `lease` (a whole `lease:`
    /// YAML section whose `hostname` is `name`) and returns once it is mounted.
    pub(crate) fn start(
        base: &Path,
        name: &str,
        lease: &str,
    ) -> Result<Node, ReplicationBenchError> {
        Ok(Node {
            name: name.to_string(),
            mount: MountGuard::start_configured(base, name, true, lease)?,
        })
    }

    /// Starts a primary (`lease.candidate: true`) named `name` under `base` and
    /// returns it with the URL replicas reach it at.
    pub(super) fn start_primary(
        base: &Path,
        name: &str,
    ) -> Result<(Node, String), ReplicationBenchError> {
        Node::start_primary_with(base, name, "", &NodeApi::open())
    }

    /// [`Node::start_primary`] with `more_config` added to its config, serving
    /// the node API as `api` says.
    pub(super) fn start_primary_with(
        base: &Path,
        name: &str,
        more_config: &str,
        api: &NodeApi,
    ) -> Result<(Node, String), ReplicationBenchError> {
        let config = format!(
            "lease:\n  type: static\n  candidate: true\n  hostname: {name}\n{more_config}{}",
            api.http
        );
        let node = Node::start(base, name, &config)?;
        let address = node.wait_for_address()?;
        Ok((node, format!("{}://{address}", api.scheme)))
    }

    /// Starts a replica named `name` under `base` that follows the primary at
    /// `primary_url`. Returns once mounted, usually before it has caught up.
    pub(super) fn start_replica(
        base: &Path,
        name: &str,
        primary_url: &str,
    ) -> Result<Node, ReplicationBenchError> {
        Node::start_replica_with(base, name, primary_url, &NodeApi::open())
    }

    /// [`Node::start_replica`] calling the primary as `api` says.
    pub(super) fn start_replica_with(
        base: &Path,
        name: &str,
        primary_url: &str,
        api: &NodeApi,
    ) -> Result<Node, ReplicationBenchError> {
        let config = format!(
            "lease:\n  type: static\n  candidate: false\n  hostname: {name}\n  advertise-url: {primary_url}\n{}",
            api.http
        );
        Node::start(base, name, &config)
    }

    /// The node's name, which is also its `lease.hostname`.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The process to measure the CPU time of, while the node runs.
    pub(super) fn process(&self) -> Option<Process> {
        self.mount.pid().map(|pid| Process {
            name: self.name.clone(),
            pid,
        })
    }

    /// The mount point, where applications open databases.
    pub(super) fn mount_point(&self) -> &Path {
        self.mount.mount_point()
    }

    /// The path of database `database` in this node's mount.
    pub(crate) fn db_path(&self, database: &str) -> PathBuf {
        self.mount.mount_point().join(database)
    }

    /// The content of the database's `-pos` file (`TXID/checksum`, both 16 hex
    /// digits), or `None` while the node does not have the database.
    pub(crate) fn position(&self, database: &str) -> Option<String> {
        std::fs::read_to_string(self.db_path(&format!("{database}-pos"))).ok()
    }

    /// The file that receives everything the node prints.
    pub(crate) fn log_path(&self) -> &Path {
        self.mount.log_path()
    }

    /// Stops the process and checks that the mount is gone.
    pub(crate) fn stop(mut self) -> Result<(), ReplicationBenchError> {
        Ok(self.mount.stop()?)
    }

    /// Waits until the node's log names the address it serves replication on,
    /// and returns the URL other nodes (and `ltxfs promote`) reach it at.
    pub(crate) fn wait_for_url(&self) -> Result<String, ReplicationBenchError> {
        self.wait_for_address()
            .map(|address| format!("http://{address}"))
    }

    /// The `host:port` the node's log names as where it serves the node API.
    fn wait_for_address(&self) -> Result<String, ReplicationBenchError> {
        let started = Instant::now();
        loop {
            // The log may not exist or be readable yet; that is the same as no line.
            let log = std::fs::read_to_string(self.mount.log_path()).unwrap_or_default();
            if let Some(address) = serving_address(&log) {
                return Ok(address.to_string());
            }
            if started.elapsed() >= ADDRESS_TIMEOUT {
                return Err(ReplicationBenchError::NoAddress {
                    node: self.name.clone(),
                    timeout: ADDRESS_TIMEOUT,
                    log: self.mount.log_path().to_path_buf(),
                });
            }
            std::thread::sleep(LOG_POLL_INTERVAL);
        }
    }
}

/// Waits until every replica's position of `database` equals the primary's, and
/// returns how long that took.
pub(crate) fn wait_converged(
    primary: &Node,
    replicas: &[&Node],
    database: &str,
    timeout: Duration,
) -> Result<Duration, ReplicationBenchError> {
    let started = Instant::now();
    let target = primary
        .position(database)
        .ok_or_else(|| ReplicationBenchError::NoPosition {
            node: primary.name.clone(),
            database: database.to_string(),
        })?;
    for replica in replicas {
        wait_for_position(replica, database, &target, timeout, started)?;
    }
    Ok(started.elapsed())
}

/// Waits until `node`'s position of `database` is `target`, at most until
/// `timeout` after `started`.
pub(super) fn wait_for_position(
    node: &Node,
    database: &str,
    target: &str,
    timeout: Duration,
    started: Instant,
) -> Result<(), ReplicationBenchError> {
    loop {
        let last = node.position(database);
        if last.as_deref() == Some(target) {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(ReplicationBenchError::NotConverged {
                replica: node.name.clone(),
                database: database.to_string(),
                target: target.trim().to_string(),
                last: last.map(|text| text.trim().to_string()),
                timeout,
            });
        }
        std::thread::sleep(POSITION_POLL_INTERVAL);
    }
}

/// How a cluster's nodes serve and call the node API: its `http` section and the
/// scheme of its URLs.
pub(super) struct NodeApi {
    http: String,
    scheme: &'static str,
}

impl NodeApi {
    /// Plain HTTP on a free loopback port, without a secret.
    pub(super) fn open() -> NodeApi {
        NodeApi {
            http: "http:\n  addr: \"127.0.0.1:0\"\n".to_string(),
            scheme: "http",
        }
    }

    /// A cluster secret and mutual TLS with a CA made for the run, whose
    /// certificate and key every node shares; the files are written in `base`.
    pub(super) fn secret_and_mutual_tls(base: &Path) -> Result<NodeApi, ReplicationBenchError> {
        let failed = |error: rcgen::Error| ReplicationBenchError::Certificates(error.to_string());
        let ca_key = rcgen::KeyPair::generate().map_err(failed)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).map_err(failed)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let node_key = rcgen::KeyPair::generate().map_err(failed)?;
        let node = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .and_then(|params| params.signed_by(&node_key, &issuer))
            .map_err(failed)?;
        let files = [
            ("ca.pem", ca.pem()),
            ("node.pem", node.pem()),
            ("node-key.pem", node_key.serialize_pem()),
        ];
        for (name, pem) in &files {
            let path = base.join(name);
            std::fs::write(&path, pem).map_err(|cause| BenchError::Io {
                action: "write a certificate",
                path,
                cause,
            })?;
        }
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|cause| BenchError::Io {
            action: "draw a cluster secret",
            path: base.to_path_buf(),
            cause: cause.into(),
        })?;
        let secret = ltxfs::hex::encode(&secret);
        let file = |name: &str| yaml_quote(&base.join(name).to_string_lossy());
        Ok(NodeApi {
            http: format!(
                "http:\n  addr: \"127.0.0.1:0\"\n  secret: \"{secret}\"\n  tls:\n    cert: {}\n    key: {}\n    ca: {}\n",
                file("node.pem"),
                file("node-key.pem"),
                file("ca.pem")
            ),
            scheme: "https",
        })
    }
}

/// The address in the last `serving replication address=...` line of a log.
fn serving_address(log: &str) -> Option<&str> {
    log.lines()
        .filter(|line| line.contains(SERVING_LINE))
        .filter_map(|line| line.split("address=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_comes_from_the_last_serving_line() {
        let log = "\
2026-11-22T10:00:00Z  INFO ltxfs::mount: mounted
2026-11-22T10:00:00Z  INFO ltxfs::replication::server: serving replication address=127.0.0.1:4100 hostname=primary
2026-11-22T10:00:01Z  INFO ltxfs::replication::server: serving replication address=127.0.0.1:4200 hostname=primary
";
        assert_eq!(serving_address(log), Some("127.0.0.1:4200"));
        assert_eq!(serving_address("INFO ltxfs::mount: mounted\n"), None);
    }
}
