//! A node's status as operators see it (`ltxfs status`): its role, its primary,
//! and every database's position and lag.
//!
//! The `Status` RPC serves [`local_status`]; [`fetch_status`] asks a node for
//! its status and validates the answer like any other message from a peer.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use crate::store::{Position, Role};

use super::proto::{self, StatusRequest};
use super::wire;
use super::{ClientCredentials, NodeContext, ReplicationError, connect, remote_error};

/// How long `ltxfs status` waits for an answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// What a node reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Whether the node is the primary or a replica.
    pub role: Role,
    /// The node's hostname.
    pub hostname: String,
    /// The primary's hostname: the node itself on the primary, the primary it is
    /// connected to on a replica, `None` on a replica that knows no primary.
    pub primary: Option<String>,
    /// Every database that has a position, ordered by name.
    pub databases: Vec<DatabaseStatus>,
    /// Whether the node replicates synchronously (`replication.synchronous`).
    pub synchronous: bool,
    /// Per backup destination and database (the primary's uploaders).
    pub backups: Vec<BackupState>,
}

/// How far one database's backup at one destination is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackupState {
    /// The destination's URL.
    pub destination: String,
    /// The database's name.
    pub database: String,
    /// The newest TXID stored there.
    pub txid: u64,
    /// How long the oldest commit not yet stored there has waited.
    pub lag_ms: u64,
    /// Upload rounds that failed since the node started.
    pub errors: u64,
    /// Whether the last round failed.
    pub failing: bool,
}

/// One database's position and lag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseStatus {
    /// The database's name.
    pub name: String,
    /// Its last TXID and the checksum after it.
    pub position: Position,
    /// How long since the primary's last timestamp (zero on the primary); `None`
    /// on a replica that has not heard from a primary.
    pub lag: Option<Duration>,
}

/// The JSON form of a [`NodeStatus`], fields in the table's order.
#[derive(serde::Serialize)]
struct JsonStatus<'a> {
    role: &'static str,
    hostname: &'a str,
    primary: Option<&'a str>,
    synchronous: bool,
    databases: Vec<JsonDatabase<'a>>,
    backups: &'a [BackupState],
}

#[derive(serde::Serialize)]
struct JsonDatabase<'a> {
    name: &'a str,
    txid: u64,
    /// 16 hex digits, as in `<db>-pos`.
    checksum: String,
    lag_ms: Option<u64>,
}

impl NodeStatus {
    /// The status as one line of JSON; checksums are 16 hex digits, lag is in
    /// milliseconds or `null`.
    pub fn to_json(&self) -> String {
        let json = JsonStatus {
            role: self.role.as_str(),
            hostname: &self.hostname,
            primary: self.primary.as_deref(),
            synchronous: self.synchronous,
            databases: self
                .databases
                .iter()
                .map(|database| JsonDatabase {
                    name: &database.name,
                    txid: database.position.txid.0,
                    checksum: database.position.checksum.to_string(),
                    lag_ms: database.lag.map(|lag| lag.as_millis() as u64),
                })
                .collect(),
            backups: &self.backups,
        };
        // Serializing strings, numbers and options cannot fail.
        serde_json::to_string(&json).unwrap_or_default()
    }
}

impl fmt::Display for NodeStatus {
    /// A short table, readable at a glance.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "role:     {}", self.role.as_str())?;
        writeln!(f, "hostname: {}", self.hostname)?;
        writeln!(
            f,
            "primary:  {}",
            self.primary.as_deref().unwrap_or("(none)")
        )?;
        writeln!(
            f,
            "commits:  {}",
            if self.synchronous {
                "synchronous (wait for a replica)"
            } else {
                "asynchronous"
            }
        )?;
        if self.databases.is_empty() {
            write!(f, "no databases")?;
            return self.fmt_backups(f);
        }
        let width = self
            .databases
            .iter()
            .map(|database| database.name.len())
            .chain(["DATABASE".len()])
            .max()
            .unwrap_or(0);
        writeln!(f)?;
        write!(
            f,
            "{:<width$}  {:>10}  {:<16}  LAG",
            "DATABASE", "TXID", "CHECKSUM"
        )?;
        for database in &self.databases {
            let lag = match database.lag {
                Some(lag) => format!("{} ms", lag.as_millis()),
                None => "unknown".to_string(),
            };
            write!(
                f,
                "\n{:<width$}  {:>10}  {}  {lag}",
                database.name, database.position.txid.0, database.position.checksum
            )?;
        }
        self.fmt_backups(f)
    }
}

impl NodeStatus {
    /// The backup table, when the node backs up.
    fn fmt_backups(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.backups.is_empty() {
            return Ok(());
        }
        write!(f, "\n\nBACKUP DATABASE  TXID  LAG  ERRORS  DESTINATION")?;
        for backup in &self.backups {
            write!(
                f,
                "\n{}  {}  {} ms  {}{}  {}",
                backup.database,
                backup.txid,
                backup.lag_ms,
                backup.errors,
                if backup.failing { " (failing)" } else { "" },
                backup.destination
            )?;
        }
        Ok(())
    }
}

/// This node's status, read from its store (takes database locks: call it on
/// the blocking pool).
pub(super) fn local_status(node: &NodeContext) -> NodeStatus {
    let cluster = node.store.cluster();
    let role = cluster.role();
    let primary = match role {
        Role::Primary => Some(node.hostname.clone()),
        Role::Replica => cluster.primary(),
    };
    let lag = cluster.lag();
    let now = crate::store::cluster::unix_now_ms();
    let backups = node
        .backups
        .snapshot()
        .into_iter()
        .flat_map(|(destination, status)| {
            status
                .databases
                .into_iter()
                .map(move |(database, backup)| BackupState {
                    destination: destination.clone(),
                    database,
                    txid: backup.txid.0,
                    lag_ms: backup.lag(now).as_millis() as u64,
                    errors: status.errors,
                    failing: status.failing,
                })
        })
        .collect();
    NodeStatus {
        role,
        hostname: node.hostname.clone(),
        primary,
        synchronous: node.synchronous,
        backups,
        databases: node
            .store
            .existing_positions()
            .into_iter()
            .map(|(name, position)| DatabaseStatus {
                name,
                position,
                lag,
            })
            .collect(),
    }
}

/// This node's metrics in Prometheus's text exposition format, served at
/// `GET /metrics` on the node's address: its role, each database's TXID, the
/// replication lag, and how many replicas stream from it.
pub(super) fn local_metrics(node: &NodeContext) -> String {
    let status = local_status(node);
    let lag = node.store.cluster().lag();
    let mut text = String::new();
    let mut metric = |name: &str, help: &str, samples: Vec<(String, String)>| {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for (labels, value) in samples {
            text.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    let unlabelled = |value: String| vec![(String::new(), value)];
    metric(
        "ltxfs_primary",
        "1 on the primary, 0 on a replica.",
        unlabelled(u8::from(status.role == Role::Primary).to_string()),
    );
    metric(
        "ltxfs_lag_seconds",
        "Seconds since the primary's last timestamp: 0 on the primary, absent on a replica that has not heard from a primary.",
        lag.map(|lag| format!("{:.3}", lag.as_secs_f64()))
            .map(unlabelled)
            .unwrap_or_default(),
    );
    metric(
        "ltxfs_replica_streams",
        "Replicas streaming change sets from this node.",
        unlabelled(node.handoffs.stream_count().to_string()),
    );
    let label = |name: &str| format!("{{db=\"{}\"}}", escape_label(name));
    metric(
        "ltxfs_db_txid",
        "The TXID of the database's last transaction.",
        status
            .databases
            .iter()
            .map(|database| (label(&database.name), database.position.txid.0.to_string()))
            .collect(),
    );
    let backup_label = |backup: &BackupState| {
        format!(
            "{{db=\"{}\",destination=\"{}\"}}",
            escape_label(&backup.database),
            escape_label(&backup.destination)
        )
    };
    metric(
        "ltxfs_backup_txid",
        "The newest TXID of the database stored at the backup destination.",
        status
            .backups
            .iter()
            .map(|backup| (backup_label(backup), backup.txid.to_string()))
            .collect(),
    );
    metric(
        "ltxfs_backup_lag_seconds",
        "How long the oldest commit not yet stored at the backup destination has waited.",
        status
            .backups
            .iter()
            .map(|backup| {
                (
                    backup_label(backup),
                    format!("{:.3}", backup.lag_ms as f64 / 1000.0),
                )
            })
            .collect(),
    );
    let mut destinations: Vec<(&str, u64, bool)> = status
        .backups
        .iter()
        .map(|backup| (backup.destination.as_str(), backup.errors, backup.failing))
        .collect();
    destinations.dedup();
    metric(
        "ltxfs_backup_errors",
        "Backup upload rounds that failed since the node started.",
        destinations
            .iter()
            .map(|(destination, errors, _)| {
                (
                    format!("{{destination=\"{}\"}}", escape_label(destination)),
                    errors.to_string(),
                )
            })
            .collect(),
    );
    text
}

/// A Prometheus label value with backslashes and quotes escaped.
fn escape_label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The wire form of a status.
pub(super) fn to_proto(status: &NodeStatus) -> proto::StatusResponse {
    proto::StatusResponse {
        role: status.role.as_str().to_string(),
        hostname: status.hostname.clone(),
        primary: status.primary.clone().unwrap_or_default(),
        synchronous: status.synchronous,
        databases: status
            .databases
            .iter()
            .map(|database| proto::DatabaseStatus {
                name: database.name.clone(),
                txid: database.position.txid.0,
                checksum: database.position.checksum.0,
                lag_ms: database.lag.map(|lag| lag.as_millis() as u64),
            })
            .collect(),
        backups: status
            .backups
            .iter()
            .map(|backup| proto::BackupStatus {
                destination: backup.destination.clone(),
                database: backup.database.clone(),
                txid: backup.txid,
                lag_ms: backup.lag_ms,
                errors: backup.errors,
                failing: backup.failing,
            })
            .collect(),
    }
}

/// Validates a node's status answer.
fn from_proto(response: proto::StatusResponse) -> Result<NodeStatus, ReplicationError> {
    const MESSAGE: &str = "StatusResponse";
    let role = match response.role.as_str() {
        "primary" => Role::Primary,
        "replica" => Role::Replica,
        _ => return Err(ReplicationError::UnknownRole(response.role)),
    };
    let primary = if response.primary.is_empty() {
        None
    } else {
        Some(wire::parse_hostname(MESSAGE, response.primary)?)
    };
    let mut seen = BTreeSet::new();
    let databases = response
        .databases
        .into_iter()
        .map(|database| {
            let (name, position) =
                wire::parse_position(MESSAGE, database.name, database.txid, database.checksum)?;
            wire::check_unique(MESSAGE, &mut seen, &name)?;
            Ok(DatabaseStatus {
                name: name.as_str().to_string(),
                position,
                lag: database.lag_ms.map(Duration::from_millis),
            })
        })
        .collect::<Result<_, ReplicationError>>()?;
    let backups = response
        .backups
        .into_iter()
        .map(|backup| BackupState {
            destination: backup.destination,
            database: backup.database,
            txid: backup.txid,
            lag_ms: backup.lag_ms,
            errors: backup.errors,
            failing: backup.failing,
        })
        .collect();
    Ok(NodeStatus {
        role,
        hostname: wire::parse_hostname(MESSAGE, response.hostname)?,
        primary,
        databases,
        synchronous: response.synchronous,
        backups,
    })
}

/// Asks the node at `url` (such as `http://127.0.0.1:20202`) for its status.
pub async fn fetch_status(
    url: &str,
    credentials: &ClientCredentials,
) -> Result<NodeStatus, ReplicationError> {
    let mut client = connect(url, credentials, Some(STATUS_TIMEOUT)).await?;
    let response = client
        .status(StatusRequest {})
        .await
        .map_err(|status| remote_error(url, &status))?;
    from_proto(response.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::{Checksum, TxId};

    fn sample() -> NodeStatus {
        NodeStatus {
            role: Role::Replica,
            hostname: "node-b".into(),
            primary: Some("node-a".into()),
            synchronous: true,
            databases: vec![
                DatabaseStatus {
                    name: "app.db".into(),
                    position: Position {
                        txid: TxId(42),
                        checksum: Checksum(0x8000_0000_0000_00ff),
                    },
                    lag: Some(Duration::from_millis(3)),
                },
                DatabaseStatus {
                    name: "a-much-longer-name.db".into(),
                    position: Position {
                        txid: TxId(7),
                        checksum: Checksum(Checksum::FLAG),
                    },
                    lag: None,
                },
            ],
            backups: vec![BackupState {
                destination: "s3://bucket/prod".into(),
                database: "app.db".into(),
                txid: 40,
                lag_ms: 900,
                errors: 2,
                failing: true,
            }],
        }
    }

    #[test]
    fn status_round_trips_through_the_wire() {
        let status = sample();
        assert_eq!(from_proto(to_proto(&status)).unwrap(), status);
        let primary = NodeStatus {
            role: Role::Primary,
            primary: None,
            databases: Vec::new(),
            ..status
        };
        assert_eq!(from_proto(to_proto(&primary)).unwrap(), primary);
    }

    #[test]
    fn a_bad_status_is_rejected() {
        let mut response = to_proto(&sample());
        response.role = "leader".into();
        assert!(matches!(
            from_proto(response).unwrap_err(),
            ReplicationError::UnknownRole(role) if role == "leader"
        ));
        let mut response = to_proto(&sample());
        response.databases[0].name = "app.db-wal".into();
        assert!(matches!(
            from_proto(response).unwrap_err(),
            ReplicationError::InvalidDatabaseName { .. }
        ));
        let mut response = to_proto(&sample());
        response.databases[1].checksum = 0;
        assert!(matches!(
            from_proto(response).unwrap_err(),
            ReplicationError::InvalidPosition { .. }
        ));
    }

    #[test]
    fn the_table_shows_every_database() {
        let table = sample().to_string();
        assert_eq!(
            table,
            "role:     replica\n\
             hostname: node-b\n\
             primary:  node-a\n\
             commits:  synchronous (wait for a replica)\n\
             \n\
             DATABASE                     TXID  CHECKSUM          LAG\n\
             app.db                         42  80000000000000ff  3 ms\n\
             a-much-longer-name.db           7  8000000000000000  unknown\n\
             \n\
             BACKUP DATABASE  TXID  LAG  ERRORS  DESTINATION\n\
             app.db  40  900 ms  2 (failing)  s3://bucket/prod"
        );
    }

    #[test]
    fn json_has_hex_checksums_and_null_lag() {
        let text = sample().to_json();
        assert!(
            text.starts_with(r#"{"role":"replica","hostname":"node-b""#),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["role"], "replica");
        assert_eq!(json["primary"], "node-a");
        assert_eq!(json["synchronous"], true);
        assert_eq!(json["databases"][0]["txid"], 42);
        assert_eq!(json["databases"][0]["checksum"], "80000000000000ff");
        assert_eq!(json["databases"][0]["lag_ms"], 3);
        assert!(json["databases"][1]["lag_ms"].is_null());
        assert_eq!(json["backups"][0]["destination"], "s3://bucket/prod");
        assert_eq!(json["backups"][0]["lag_ms"], 900);
        assert_eq!(json["backups"][0]["failing"], true);
    }
}
