//! The boundary between the generated protobuf types and the domain: builds the
//! messages this node sends, and validates every message a peer sends into a
//! domain type.
//!
//! Invariants: nothing from the network is trusted. A database name is one the
//! store would accept as a database's name in the mount root, a hostname can be
//! served in `.primary` (one line, no spaces), a position has a TXID of at least 1
//! and a checksum with bit 63 set, a chunk is at most [`CHUNK_SIZE`] bytes and
//! carries a CRC-64 exactly when it is the last of its change set, and a message's
//! `oneof` is set. Anything else is a [`ReplicationError`] that names the message
//! and the field.

use std::collections::{BTreeMap, BTreeSet};

use crate::ltx::{Checksum, TxId};
use crate::store::{FileKind, Position, parse_name};

use super::peers::{MAX_PEERS, Peer};
use super::proto::{self, stream_message};
use super::{CHUNK_SIZE, MAX_NAME_BYTES, PROTOCOL_VERSION, ReplicationError};

/// How much of a rejected name or hostname an error message shows.
const SHOWN_CHARS: usize = 80;

/// A database name received from a peer, checked as the store checks names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct DatabaseName(String);

impl DatabaseName {
    /// Checks that `name` (from a `message`) is a database's name in the mount root.
    pub(super) fn parse(message: &'static str, name: String) -> Result<Self, ReplicationError> {
        let invalid = |reason: String| ReplicationError::InvalidDatabaseName {
            message,
            name: shown(&name),
            reason,
        };
        if name.len() > MAX_NAME_BYTES {
            return Err(invalid(format!(
                "{} bytes is longer than {MAX_NAME_BYTES}",
                name.len()
            )));
        }
        let parsed = parse_name(&name).map_err(|error| invalid(error.to_string()))?;
        if parsed.kind != FileKind::Database {
            return Err(invalid(format!(
                "it names a companion file of database {:?}",
                parsed.database
            )));
        }
        Ok(DatabaseName(name))
    }

    /// The name.
    pub(super) fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a replica asks for when it opens a stream.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct StreamOpen {
    /// The replica's hostname.
    pub(super) hostname: String,
    /// Whether the replica may become the primary.
    pub(super) candidate: bool,
    /// Where each of the replica's databases stands.
    pub(super) positions: Vec<(DatabaseName, Position)>,
    /// Per database, where its newest change sets end on the replica, newest
    /// first (see [`MAX_HISTORY_POINTS`]).
    pub(super) histories: BTreeMap<String, Vec<Position>>,
    /// Where other nodes reach the replica, if it said.
    pub(super) advertise_url: Option<String>,
    /// When not empty, the requester catches up from this node before it takes
    /// over as the primary: only these databases, and the stream ends at `Ready`.
    pub(super) catch_up_databases: Vec<DatabaseName>,
}

/// How many change-set ends a replica sends per database when it opens a stream,
/// at most.
pub(super) const MAX_HISTORY_POINTS: usize = 4096;

/// How many it sends over all its databases, so that the request stays far
/// below the message size limit however many databases there are (a point takes
/// at most 24 bytes on the wire).
const MAX_TOTAL_HISTORY_POINTS: usize = 32_768;

/// How many change-set ends a replica with `databases` databases sends for each.
pub(super) fn history_points_per_database(databases: usize) -> usize {
    (MAX_TOTAL_HISTORY_POINTS / databases.max(1)).min(MAX_HISTORY_POINTS)
}

/// A message from the primary on a stream, validated.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PrimaryMessage {
    /// The stream's first message.
    Hello {
        /// The primary's hostname.
        hostname: String,
        /// The primary's clock, in Unix milliseconds.
        timestamp_ms: u64,
        /// The primary's write-forwarding proxy, if it runs one.
        proxy_url: Option<String>,
        /// When the primary replicates synchronously, the stream's number, which
        /// the replica's acknowledgements name.
        acknowledge_stream: Option<u64>,
    },
    /// Part of a change set.
    Chunk(Chunk),
    /// Every database has been caught up.
    Ready,
    /// The primary is idle.
    Heartbeat {
        /// The primary's clock, in Unix milliseconds.
        timestamp_ms: u64,
        /// Where each database stands on this stream.
        positions: Vec<(DatabaseName, Position)>,
    },
    /// The primary hands its role to the replica called `to`; nothing follows.
    Handoff {
        /// The replica that takes the lease.
        to: String,
        /// Where every database stands after everything the primary accepted.
        positions: Vec<(DatabaseName, Position)>,
    },
    /// The replicas connected to the primary.
    Peers(Vec<Peer>),
}

impl PrimaryMessage {
    /// The message type's name, for errors and logs.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            PrimaryMessage::Hello { .. } => "Hello",
            PrimaryMessage::Chunk(_) => "LtxChunk",
            PrimaryMessage::Ready => "Ready",
            PrimaryMessage::Heartbeat { .. } => "Heartbeat",
            PrimaryMessage::Handoff { .. } => "Handoff",
            PrimaryMessage::Peers(_) => "Peers",
        }
    }
}

/// Part of one change set, at most [`CHUNK_SIZE`] bytes.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Chunk {
    /// The database the change set belongs to.
    pub(super) database: DatabaseName,
    /// The bytes.
    pub(super) data: Vec<u8>,
    /// On the change set's last chunk, and only there, the CRC-64 that binds the
    /// whole change set to its database (see [`ChangeSetCrc`](super::crc::ChangeSetCrc)).
    pub(super) crc64: Option<u64>,
    /// On the last chunk of a snapshot sent because the histories diverged, the
    /// newest TXID the replica's and the primary's histories share.
    pub(super) shared_txid: Option<TxId>,
}

/// Who asks for a stream.
#[derive(Debug, Clone, Copy)]
pub(super) struct StreamAsker<'a> {
    /// Its hostname.
    pub(super) hostname: &'a str,
    /// Whether it may become the primary.
    pub(super) candidate: bool,
    /// Where other nodes reach it, if it says.
    pub(super) advertise_url: Option<&'a str>,
}

/// A replica without an advertised URL, for tests.
#[cfg(test)]
pub(super) fn test_asker(hostname: &str, candidate: bool) -> StreamAsker<'_> {
    StreamAsker {
        hostname,
        candidate,
        advertise_url: None,
    }
}

/// The request a replica sends to open a stream.
pub(super) fn stream_request(
    replica: &StreamAsker<'_>,
    positions: &[(String, Position)],
    histories: &[(String, Vec<Position>)],
    catch_up_databases: &[String],
) -> proto::StreamRequest {
    proto::StreamRequest {
        hostname: replica.hostname.to_string(),
        candidate: replica.candidate,
        advertise_url: replica.advertise_url.unwrap_or_default().to_string(),
        catch_up_databases: catch_up_databases.to_vec(),
        positions: positions
            .iter()
            .map(|(name, position)| position_to_proto(name, *position))
            .collect(),
        protocol_version: PROTOCOL_VERSION,
        histories: histories
            .iter()
            .map(|(name, points)| proto::DatabaseHistory {
                name: name.clone(),
                points: points
                    .iter()
                    .map(|point| proto::HistoryPoint {
                        txid: point.txid.0,
                        checksum: point.checksum.0,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Validates a replica's request to open a stream.
pub(super) fn parse_stream_request(
    request: proto::StreamRequest,
) -> Result<StreamOpen, ReplicationError> {
    const MESSAGE: &str = "StreamRequest";
    check_protocol_version(MESSAGE, request.protocol_version)?;
    Ok(StreamOpen {
        hostname: parse_hostname(MESSAGE, request.hostname)?,
        candidate: request.candidate,
        positions: parse_positions(MESSAGE, request.positions)?,
        histories: parse_histories(MESSAGE, request.histories)?,
        advertise_url: parse_node_url(MESSAGE, "advertise URL", request.advertise_url)?,
        catch_up_databases: parse_database_names(MESSAGE, request.catch_up_databases)?,
    })
}

/// Validates a list of database names: valid, each at most once.
fn parse_database_names(
    message: &'static str,
    names: Vec<String>,
) -> Result<Vec<DatabaseName>, ReplicationError> {
    let mut seen = BTreeSet::new();
    names
        .into_iter()
        .map(|name| {
            let name = DatabaseName::parse(message, name)?;
            check_unique(message, &mut seen, &name)?;
            Ok(name)
        })
        .collect()
}

/// Validates the replica's histories: valid names, each at most once, at most
/// [`MAX_HISTORY_POINTS`] real positions each.
fn parse_histories(
    message: &'static str,
    histories: Vec<proto::DatabaseHistory>,
) -> Result<BTreeMap<String, Vec<Position>>, ReplicationError> {
    let mut seen = BTreeSet::new();
    let mut parsed = BTreeMap::new();
    for history in histories {
        let name = DatabaseName::parse(message, history.name)?;
        check_unique(message, &mut seen, &name)?;
        if history.points.len() > MAX_HISTORY_POINTS {
            return Err(ReplicationError::InvalidPosition {
                message,
                database: name.0,
                reason: "the history lists more than 4096 points",
            });
        }
        let points = history
            .points
            .into_iter()
            .map(|point| {
                parse_position(message, name.0.clone(), point.txid, point.checksum)
                    .map(|(_, position)| position)
            })
            .collect::<Result<Vec<_>, _>>()?;
        parsed.insert(name.0, points);
    }
    Ok(parsed)
}

/// The first message of a stream.
pub(super) fn hello(
    hostname: &str,
    timestamp_ms: u64,
    proxy_url: Option<&str>,
    acknowledge_stream: Option<u64>,
) -> proto::StreamMessage {
    message(stream_message::Message::Hello(proto::Hello {
        hostname: hostname.to_string(),
        timestamp_ms,
        protocol_version: PROTOCOL_VERSION,
        proxy_url: proxy_url.unwrap_or_default().to_string(),
        stream_id: acknowledge_stream.unwrap_or_default(),
        acknowledge: acknowledge_stream.is_some(),
    }))
}

/// A replica's acknowledgement of what it applied from stream `stream_id`.
pub(super) fn acknowledgement(
    stream_id: u64,
    positions: &BTreeMap<String, Position>,
) -> proto::AcknowledgeRequest {
    proto::AcknowledgeRequest {
        stream_id,
        positions: positions
            .iter()
            .map(|(name, position)| position_to_proto(name, *position))
            .collect(),
    }
}

/// Validates a replica's acknowledgement: the stream it names and its positions.
pub(super) fn parse_acknowledgement(
    request: proto::AcknowledgeRequest,
) -> Result<(u64, Vec<(DatabaseName, Position)>), ReplicationError> {
    Ok((
        request.stream_id,
        parse_positions("AcknowledgeRequest", request.positions)?,
    ))
}

/// A piece of a change set of `database`; `crc64` is given on the last piece
/// only, and so is `shared_txid` (a snapshot's, when the histories diverged).
pub(super) fn ltx_chunk(
    database: &str,
    data: Vec<u8>,
    crc64: Option<u64>,
    shared_txid: Option<TxId>,
) -> proto::StreamMessage {
    message(stream_message::Message::LtxChunk(proto::LtxChunk {
        database: database.to_string(),
        data,
        last: crc64.is_some(),
        crc64,
        shared_txid: shared_txid.map(|txid| txid.0),
    }))
}

/// The marker that every database has been caught up.
pub(super) fn ready() -> proto::StreamMessage {
    message(stream_message::Message::Ready(proto::Ready {}))
}

/// A heartbeat with the primary's clock and the stream's positions.
pub(super) fn heartbeat<'a>(
    timestamp_ms: u64,
    positions: impl IntoIterator<Item = (&'a String, &'a Position)>,
) -> proto::StreamMessage {
    message(stream_message::Message::Heartbeat(proto::Heartbeat {
        timestamp_ms,
        positions: positions
            .into_iter()
            .map(|(name, position)| position_to_proto(name, *position))
            .collect(),
    }))
}

/// The last message of a stream whose primary hands its role to `to`.
pub(super) fn handoff(to: &str, positions: &[(String, Position)]) -> proto::StreamMessage {
    message(stream_message::Message::Handoff(proto::Handoff {
        to: to.to_string(),
        positions: positions
            .iter()
            .map(|(name, position)| position_to_proto(name, *position))
            .collect(),
    }))
}

/// The replicas connected to the primary.
pub(super) fn peers(peers: &[Peer]) -> proto::StreamMessage {
    message(stream_message::Message::Peers(proto::Peers {
        peers: peers
            .iter()
            .map(|peer| proto::Peer {
                hostname: peer.hostname.clone(),
                url: peer.url.clone(),
            })
            .collect(),
    }))
}

fn message(message: stream_message::Message) -> proto::StreamMessage {
    proto::StreamMessage {
        message: Some(message),
    }
}

/// Validates a message from the primary.
pub(super) fn parse_primary_message(
    message: proto::StreamMessage,
) -> Result<PrimaryMessage, ReplicationError> {
    let message = message.message.ok_or(ReplicationError::MissingField {
        message: "StreamMessage",
        field: "message (Hello, LtxChunk, Ready, Heartbeat, Handoff or Peers)",
    })?;
    Ok(match message {
        stream_message::Message::Hello(hello) => {
            check_protocol_version("Hello", hello.protocol_version)?;
            PrimaryMessage::Hello {
                hostname: parse_hostname("Hello", hello.hostname)?,
                timestamp_ms: hello.timestamp_ms,
                proxy_url: parse_node_url("Hello", "proxy URL", hello.proxy_url)?,
                acknowledge_stream: hello.acknowledge.then_some(hello.stream_id),
            }
        }
        stream_message::Message::LtxChunk(chunk) => {
            let database = DatabaseName::parse("LtxChunk", chunk.database)?;
            if chunk.data.len() > CHUNK_SIZE {
                return Err(ReplicationError::OversizedChunk {
                    database: database.0,
                    len: chunk.data.len(),
                });
            }
            match (chunk.last, chunk.crc64) {
                (true, None) => {
                    return Err(ReplicationError::MissingField {
                        message: "LtxChunk",
                        field: "crc64 (required on the last chunk of a change set)",
                    });
                }
                (false, Some(_)) => {
                    return Err(ReplicationError::MisplacedLastChunkField {
                        database: database.0,
                        field: "a crc64",
                    });
                }
                _ => {}
            }
            if !chunk.last && chunk.shared_txid.is_some() {
                return Err(ReplicationError::MisplacedLastChunkField {
                    database: database.0,
                    field: "a shared_txid",
                });
            }
            PrimaryMessage::Chunk(Chunk {
                database,
                data: chunk.data,
                crc64: chunk.crc64,
                shared_txid: chunk.shared_txid.map(TxId),
            })
        }
        stream_message::Message::Ready(proto::Ready {}) => PrimaryMessage::Ready,
        stream_message::Message::Heartbeat(heartbeat) => PrimaryMessage::Heartbeat {
            timestamp_ms: heartbeat.timestamp_ms,
            positions: parse_positions("Heartbeat", heartbeat.positions)?,
        },
        stream_message::Message::Handoff(handoff) => PrimaryMessage::Handoff {
            to: parse_hostname("Handoff", handoff.to)?,
            positions: parse_positions("Handoff", handoff.positions)?,
        },
        stream_message::Message::Peers(peers) => {
            if peers.peers.len() > MAX_PEERS {
                return Err(ReplicationError::TooManyPeers(peers.peers.len()));
            }
            let peers = peers
                .peers
                .into_iter()
                .map(|peer| {
                    let hostname = parse_hostname("Peers", peer.hostname)?;
                    match parse_node_url("Peers", "peer URL", peer.url)? {
                        Some(url) => Ok(Peer { hostname, url }),
                        None => Err(ReplicationError::MissingField {
                            message: "Peers",
                            field: "a peer's url",
                        }),
                    }
                })
                .collect::<Result<_, _>>()?;
            PrimaryMessage::Peers(peers)
        }
    })
}

/// The wire form of a database's position.
pub(super) fn position_to_proto(name: &str, position: Position) -> proto::DatabasePosition {
    proto::DatabasePosition {
        name: name.to_string(),
        txid: position.txid.0,
        checksum: position.checksum.0,
    }
}

/// Validates a list of positions: valid names, each at most once, real positions.
pub(super) fn parse_positions(
    message: &'static str,
    positions: Vec<proto::DatabasePosition>,
) -> Result<Vec<(DatabaseName, Position)>, ReplicationError> {
    let mut seen = BTreeSet::new();
    positions
        .into_iter()
        .map(|position| {
            let parsed = parse_position(message, position.name, position.txid, position.checksum)?;
            check_unique(message, &mut seen, &parsed.0)?;
            Ok(parsed)
        })
        .collect()
}

/// Validates one database's name and position.
pub(super) fn parse_position(
    message: &'static str,
    name: String,
    txid: u64,
    checksum: u64,
) -> Result<(DatabaseName, Position), ReplicationError> {
    let name = DatabaseName::parse(message, name)?;
    let invalid = |reason| ReplicationError::InvalidPosition {
        message,
        database: name.0.clone(),
        reason,
    };
    if txid == 0 {
        return Err(invalid("TXID 0 (TXIDs start at 1)"));
    }
    let checksum = Checksum(checksum);
    if !checksum.has_flag() {
        return Err(invalid("the checksum does not have bit 63 set"));
    }
    let position = Position {
        txid: TxId(txid),
        checksum,
    };
    Ok((name, position))
}

/// Fails when `name` is already in `seen` (a message lists it twice).
pub(super) fn check_unique(
    message: &'static str,
    seen: &mut BTreeSet<DatabaseName>,
    name: &DatabaseName,
) -> Result<(), ReplicationError> {
    if seen.insert(name.clone()) {
        Ok(())
    } else {
        Err(ReplicationError::DuplicateDatabase {
            message,
            name: name.0.clone(),
        })
    }
}

/// Validates a hostname that may be served in `.primary`.
pub(super) fn parse_hostname(
    message: &'static str,
    hostname: String,
) -> Result<String, ReplicationError> {
    let invalid = |reason| ReplicationError::InvalidHostname {
        message,
        hostname: shown(&hostname),
        reason,
    };
    if hostname.is_empty() {
        return Err(invalid("it is empty"));
    }
    if hostname.len() > MAX_NAME_BYTES {
        return Err(invalid("it is longer than 255 bytes"));
    }
    if hostname
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid("it contains whitespace or a control character"));
    }
    Ok(hostname)
}

/// Validates a node's URL (`field` of a `message`): empty for none, else an
/// `http://` or `https://` URL of at most 2048 bytes without whitespace.
fn parse_node_url(
    message: &str,
    field: &str,
    url: String,
) -> Result<Option<String>, ReplicationError> {
    if url.is_empty() {
        return Ok(None);
    }
    let invalid = |reason: &str| ReplicationError::InvalidUrl {
        url: shown(&url),
        reason: format!("the {message} message's {field} {reason}"),
    };
    if url.len() > 2048 {
        return Err(invalid("is longer than 2048 bytes"));
    }
    let host = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    if host.is_none_or(str::is_empty) {
        return Err(invalid("is not an http:// or https:// URL with a host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("contains whitespace or a control character"));
    }
    Ok(Some(url))
}

fn check_protocol_version(message: &'static str, received: u32) -> Result<(), ReplicationError> {
    if received == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ReplicationError::ProtocolVersion { message, received })
    }
}

/// The start of a peer's string, for an error message.
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(txid: u64) -> Position {
        Position {
            txid: TxId(txid),
            checksum: Checksum(Checksum::FLAG | txid),
        }
    }

    fn parse(message: stream_message::Message) -> Result<PrimaryMessage, ReplicationError> {
        parse_primary_message(proto::StreamMessage {
            message: Some(message),
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Whatever bytes a peer sends, decoding and validating them ends in a
        /// message or an error, never a panic.
        #[test]
        fn prop_any_bytes_from_a_peer_are_refused_or_accepted_cleanly(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            use prost::Message;
            if let Ok(message) = proto::StreamMessage::decode(bytes.as_slice()) {
                let _ = parse_primary_message(message);
            }
            if let Ok(request) = proto::StreamRequest::decode(bytes.as_slice()) {
                let _ = parse_stream_request(request);
            }
            if let Ok(acknowledgement) = proto::AcknowledgeRequest::decode(bytes.as_slice()) {
                let _ = parse_acknowledgement(acknowledgement);
            }
        }
    }

    #[test]
    fn a_stream_request_round_trips() {
        let positions = vec![
            ("a.db".to_string(), position(3)),
            ("b".to_string(), position(9)),
        ];
        let open = parse_stream_request(stream_request(
            &test_asker("node-b", true),
            &positions,
            &[],
            &[],
        ))
        .unwrap();
        assert_eq!(open.hostname, "node-b");
        assert!(open.candidate);
        let names: Vec<_> = open
            .positions
            .iter()
            .map(|(n, p)| (n.as_str(), *p))
            .collect();
        assert_eq!(names, vec![("a.db", position(3)), ("b", position(9))]);
    }

    #[test]
    fn messages_from_the_primary_round_trip() {
        let hello_message = parse_primary_message(hello("node-a", 1234, None, None)).unwrap();
        assert_eq!(
            hello_message,
            PrimaryMessage::Hello {
                hostname: "node-a".into(),
                timestamp_ms: 1234,
                proxy_url: None,
                acknowledge_stream: None,
            }
        );
        let synchronous = parse_primary_message(hello("node-a", 1, None, Some(0))).unwrap();
        assert!(matches!(
            synchronous,
            PrimaryMessage::Hello {
                acknowledge_stream: Some(0),
                ..
            }
        ));
        let with_proxy =
            parse_primary_message(hello("node-a", 1, Some("http://a:8080"), None)).unwrap();
        assert!(matches!(
            with_proxy,
            PrimaryMessage::Hello { proxy_url: Some(url), .. } if url == "http://a:8080"
        ));
        let with_tls =
            parse_primary_message(hello("node-a", 1, Some("https://a:8080"), None)).unwrap();
        assert!(matches!(
            with_tls,
            PrimaryMessage::Hello { proxy_url: Some(url), .. } if url == "https://a:8080"
        ));
        for bad in ["ftp://a", "http://", "https://", "http://a b"] {
            assert!(matches!(
                parse_primary_message(hello("node-a", 1, Some(bad), None)).unwrap_err(),
                ReplicationError::InvalidUrl { .. }
            ));
        }
        assert_eq!(
            parse_primary_message(ready()).unwrap(),
            PrimaryMessage::Ready
        );
        let chunk =
            parse_primary_message(ltx_chunk("app.db", vec![1, 2, 3], Some(77), None)).unwrap();
        assert_eq!(
            chunk,
            PrimaryMessage::Chunk(Chunk {
                database: DatabaseName("app.db".into()),
                data: vec![1, 2, 3],
                crc64: Some(77),
                shared_txid: None,
            })
        );
        let chunk = parse_primary_message(ltx_chunk("app.db", vec![4], None, None)).unwrap();
        assert!(matches!(
            chunk,
            PrimaryMessage::Chunk(Chunk { crc64: None, .. })
        ));
        let name = "app.db".to_string();
        let beat = parse_primary_message(heartbeat(99, [(&name, &position(4))])).unwrap();
        assert_eq!(
            beat,
            PrimaryMessage::Heartbeat {
                timestamp_ms: 99,
                positions: vec![(DatabaseName("app.db".into()), position(4))]
            }
        );
        let handed_off = parse_primary_message(handoff("node-b", &[(name, position(4))])).unwrap();
        assert_eq!(
            handed_off,
            PrimaryMessage::Handoff {
                to: "node-b".into(),
                positions: vec![(DatabaseName("app.db".into()), position(4))]
            }
        );
        assert!(matches!(
            parse_primary_message(handoff("", &[])).unwrap_err(),
            ReplicationError::InvalidHostname {
                message: "Handoff",
                ..
            }
        ));
    }

    #[test]
    fn a_catch_up_request_names_its_databases_and_its_url() {
        let asker = StreamAsker {
            hostname: "node-b",
            candidate: true,
            advertise_url: Some("http://10.0.0.2:20202"),
        };
        let catch_up = ["a.db".to_string(), "new.db".to_string()];
        let request = stream_request(&asker, &[("a.db".to_string(), position(3))], &[], &catch_up);
        let open = parse_stream_request(request).unwrap();
        assert_eq!(open.advertise_url.as_deref(), Some("http://10.0.0.2:20202"));
        let names: Vec<_> = open
            .catch_up_databases
            .iter()
            .map(DatabaseName::as_str)
            .collect();
        assert_eq!(names, ["a.db", "new.db"]);

        let twice = ["a.db".to_string(), "a.db".to_string()];
        assert!(matches!(
            parse_stream_request(stream_request(&asker, &[], &[], &twice)).unwrap_err(),
            ReplicationError::DuplicateDatabase { .. }
        ));
        let companion = ["a.db-wal".to_string()];
        assert!(matches!(
            parse_stream_request(stream_request(&asker, &[], &[], &companion)).unwrap_err(),
            ReplicationError::InvalidDatabaseName { .. }
        ));
        let bad_url = StreamAsker {
            advertise_url: Some("node-b:20202"),
            ..asker
        };
        assert!(matches!(
            parse_stream_request(stream_request(&bad_url, &[], &[], &[])).unwrap_err(),
            ReplicationError::InvalidUrl { .. }
        ));
    }

    #[test]
    fn peers_travel_and_are_checked() {
        let peer = |hostname: &str, url: &str| Peer {
            hostname: hostname.into(),
            url: url.into(),
        };
        let sent = vec![
            peer("node-b", "http://10.0.0.2:20202"),
            peer("node-c", "http://10.0.0.3:20202"),
        ];
        assert_eq!(
            parse_primary_message(peers(&sent)).unwrap(),
            PrimaryMessage::Peers(sent)
        );
        assert_eq!(
            parse_primary_message(peers(&[])).unwrap(),
            PrimaryMessage::Peers(Vec::new())
        );
        assert!(matches!(
            parse_primary_message(peers(&[peer("node b", "http://b")])).unwrap_err(),
            ReplicationError::InvalidHostname {
                message: "Peers",
                ..
            }
        ));
        assert!(matches!(
            parse_primary_message(peers(&[peer("node-b", "")])).unwrap_err(),
            ReplicationError::MissingField {
                message: "Peers",
                ..
            }
        ));
        assert!(matches!(
            parse_primary_message(peers(&[peer("node-b", "ftp://b")])).unwrap_err(),
            ReplicationError::InvalidUrl { .. }
        ));
        let many = vec![peer("node-b", "http://b"); MAX_PEERS + 1];
        assert!(matches!(
            parse_primary_message(peers(&many)).unwrap_err(),
            ReplicationError::TooManyPeers(count) if count == MAX_PEERS + 1
        ));
    }

    #[test]
    fn a_message_without_its_oneof_is_rejected() {
        let error = parse_primary_message(proto::StreamMessage { message: None }).unwrap_err();
        assert!(matches!(
            error,
            ReplicationError::MissingField {
                message: "StreamMessage",
                ..
            }
        ));
    }

    #[test]
    fn bad_database_names_are_rejected() {
        for name in [
            "",
            ".primary",
            "app.db-journal",
            "app.db-wal",
            "app.db-pos",
            "dir/app.db",
            "nul\0",
        ] {
            let error = parse(stream_message::Message::LtxChunk(proto::LtxChunk {
                database: name.to_string(),
                data: vec![1],
                last: true,
                crc64: Some(1),
                shared_txid: None,
            }))
            .unwrap_err();
            assert!(
                matches!(
                    &error,
                    ReplicationError::InvalidDatabaseName {
                        message: "LtxChunk",
                        ..
                    }
                ),
                "{name:?}: {error}"
            );
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let error = DatabaseName::parse("Heartbeat", long).unwrap_err();
        assert!(error.to_string().contains("longer than 255"), "{error}");
        assert!(error.to_string().len() < 300, "the name is cut: {error}");
    }

    #[test]
    fn a_replica_history_and_a_shared_txid_travel_and_are_checked() {
        let points = vec![position(7), position(6)];
        let histories = [("app.db".to_string(), points.clone())];
        let open = parse_stream_request(stream_request(
            &test_asker("node-b", false),
            &[],
            &histories,
            &[],
        ))
        .unwrap();
        assert_eq!(open.histories.get("app.db"), Some(&points));
        let too_long = [(
            "app.db".to_string(),
            vec![position(1); MAX_HISTORY_POINTS + 1],
        )];
        assert!(matches!(
            parse_stream_request(stream_request(&test_asker("node-b", false), &[], &too_long, &[])).unwrap_err(),
            ReplicationError::InvalidPosition { database, .. } if database == "app.db"
        ));
        let bad_point = [("app.db".to_string(), vec![Position::UNKNOWN])];
        assert!(matches!(
            parse_stream_request(stream_request(
                &test_asker("node-b", false),
                &[],
                &bad_point,
                &[]
            ))
            .unwrap_err(),
            ReplicationError::InvalidPosition { .. }
        ));

        let last = parse_primary_message(ltx_chunk("app.db", vec![1], Some(7), Some(TxId(3))));
        assert!(matches!(
            last.unwrap(),
            PrimaryMessage::Chunk(Chunk {
                shared_txid: Some(TxId(3)),
                ..
            })
        ));
        let not_last = parse_primary_message(message(stream_message::Message::LtxChunk(
            proto::LtxChunk {
                database: "app.db".into(),
                data: vec![1],
                last: false,
                crc64: None,
                shared_txid: Some(3),
            },
        )));
        assert!(matches!(
            not_last.unwrap_err(),
            ReplicationError::MisplacedLastChunkField {
                field: "a shared_txid",
                ..
            }
        ));
    }

    #[test]
    fn the_histories_of_many_databases_stay_far_below_the_message_limit() {
        use prost::Message;
        assert_eq!(history_points_per_database(1), MAX_HISTORY_POINTS);
        let databases = 1000;
        let limit = history_points_per_database(databases);
        assert_eq!(limit, 32);
        let name = |i: usize| format!("{i:0>250}.db");
        let worst = Position {
            txid: TxId(u64::MAX),
            checksum: Checksum(u64::MAX),
        };
        let positions: Vec<_> = (0..databases).map(|i| (name(i), worst)).collect();
        let histories: Vec<_> = (0..databases)
            .map(|i| (name(i), vec![worst; limit]))
            .collect();
        let request = stream_request(&test_asker("node-b", true), &positions, &histories, &[]);
        assert!(
            request.encoded_len() < super::super::MAX_MESSAGE_BYTES / 2,
            "{} bytes",
            request.encoded_len()
        );
    }

    #[test]
    fn an_oversized_chunk_is_rejected() {
        let error = parse_primary_message(ltx_chunk("app.db", vec![0; CHUNK_SIZE + 1], None, None))
            .unwrap_err();
        assert!(matches!(
            error,
            ReplicationError::OversizedChunk { len, .. } if len == CHUNK_SIZE + 1
        ));
        assert!(
            parse_primary_message(ltx_chunk("app.db", vec![0; CHUNK_SIZE], None, None)).is_ok()
        );
    }

    #[test]
    fn the_crc_comes_with_the_last_chunk_and_only_with_it() {
        let chunk = |last, crc64| {
            parse(stream_message::Message::LtxChunk(proto::LtxChunk {
                database: "app.db".into(),
                data: vec![1],
                last,
                crc64,
                shared_txid: None,
            }))
        };
        assert!(matches!(
            chunk(true, None).unwrap_err(),
            ReplicationError::MissingField {
                message: "LtxChunk",
                ..
            }
        ));
        let error = chunk(false, Some(5)).unwrap_err();
        assert!(
            matches!(&error, ReplicationError::MisplacedLastChunkField { database, field: "a crc64" } if database == "app.db"),
            "{error}"
        );
    }

    #[test]
    fn invalid_positions_are_rejected() {
        let bad = |txid, checksum| {
            parse_positions(
                "Heartbeat",
                vec![proto::DatabasePosition {
                    name: "app.db".into(),
                    txid,
                    checksum,
                }],
            )
            .unwrap_err()
        };
        assert!(matches!(
            bad(0, Checksum::FLAG),
            ReplicationError::InvalidPosition { .. }
        ));
        assert!(matches!(
            bad(5, 7),
            ReplicationError::InvalidPosition { .. }
        ));
        let twice = vec![
            position_to_proto("app.db", position(1)),
            position_to_proto("app.db", position(2)),
        ];
        assert!(matches!(
            parse_positions("StreamRequest", twice).unwrap_err(),
            ReplicationError::DuplicateDatabase { .. }
        ));
    }

    #[test]
    fn bad_hostnames_and_versions_are_rejected() {
        for hostname in ["", "two words", "line\nbreak", &"h".repeat(256)] {
            let mut request = stream_request(&test_asker("ok", false), &[], &[], &[]);
            request.hostname = hostname.to_string();
            assert!(matches!(
                parse_stream_request(request).unwrap_err(),
                ReplicationError::InvalidHostname { .. }
            ));
        }
        let mut request = stream_request(&test_asker("ok", false), &[], &[], &[]);
        request.protocol_version = 2;
        assert!(matches!(
            parse_stream_request(request).unwrap_err(),
            ReplicationError::ProtocolVersion { received: 2, .. }
        ));
        let error = parse(stream_message::Message::Hello(proto::Hello {
            hostname: "node-a".into(),
            timestamp_ms: 1,
            protocol_version: 0,
            ..proto::Hello::default()
        }))
        .unwrap_err();
        assert!(matches!(
            error,
            ReplicationError::ProtocolVersion {
                message: "Hello",
                received: 0
            }
        ));
    }
}
