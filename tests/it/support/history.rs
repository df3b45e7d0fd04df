//! The history check of the cluster tests: every node keeps, in its change-set
//! log (`<data dir>/dbs/<database>/log`), each transaction it accepted, as the
//! LTX change set with its TXIDs, the lease epoch it was written under (the
//! header's node ID) and the database checksum after it. Across the nodes of a
//! run, no TXID may have been accepted with different content: wherever two
//! logs hold a change set ending at the same TXID of a database, the checksum
//! after it must be the same. The epochs of such a pair are compared too, but a
//! difference there with equal content is reported rather than failed: the
//! issue's property is about content, and equal content legitimately comes
//! with another epoch when a node was resynchronised by snapshot. A snapshot
//! carries the epoch of the primary that sent it (so that the replica then
//! refuses older primaries), while the other nodes logged that TXID as the
//! change set of the primary that wrote it. The partition test shows this: a
//! replica that had one more of the isolated primary's transactions than the
//! new primary gets the new primary's snapshot at its first TXID.
//!
//! A log that a snapshot replaced starts at the snapshot; change sets merged by
//! retention end at the last TXID of the merge. Both still end at TXIDs that the
//! other logs can be compared with.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use ltxfs::ltx::{HEADER_SIZE, Header, TRAILER_SIZE, Trailer};
use ltxfs::store::log::read_change_sets;

/// Where one accepted transaction left a database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The lease epoch it was written under.
    pub epoch: u64,
    /// The database checksum after it.
    pub checksum: u64,
}

/// One node's accepted transactions: per database, per last TXID of a change set.
pub type History = BTreeMap<(String, u64), Accepted>;

/// Reads the history kept in the data dir `data_dir` (the node may be running:
/// an incomplete last record is left out).
pub fn read_history(data_dir: &Path) -> History {
    let mut history = History::new();
    let Ok(databases) = fs::read_dir(data_dir.join("dbs")) else {
        return history;
    };
    for entry in databases {
        let entry = entry.expect("list the databases of a data dir");
        let database = entry.file_name().to_string_lossy().into_owned();
        let log = entry.path().join("log");
        if !log.exists() {
            continue;
        }
        let change_sets = read_change_sets(&log)
            .unwrap_or_else(|error| panic!("read {}: {error}", log.display()));
        for ltx in change_sets {
            let header = Header::decode(&ltx[..HEADER_SIZE]).expect("a logged LTX header");
            let trailer =
                Trailer::decode(&ltx[ltx.len() - TRAILER_SIZE..]).expect("a logged LTX trailer");
            history.insert(
                (database.clone(), header.max_txid.0),
                Accepted {
                    epoch: header.node_id,
                    checksum: trailer.post_apply_checksum.0,
                },
            );
        }
    }
    history
}

/// What [`check_histories`] found.
#[derive(Debug, Default)]
pub struct Comparison {
    /// How many (database, TXID) points were compared between at least two nodes.
    pub compared: usize,
    /// Points where two nodes agree on the content but not on the epoch, described.
    pub epoch_differences: Vec<String>,
}

/// Checks that no TXID was accepted with different content on two nodes; panics
/// naming both otherwise.
pub fn check_histories(nodes: &[(&str, History)]) -> Comparison {
    let mut seen: BTreeMap<&(String, u64), (&str, Accepted)> = BTreeMap::new();
    let mut comparison = Comparison::default();
    for (node, history) in nodes {
        for (point, accepted) in history {
            match seen.get(point) {
                Some((first_node, first)) => {
                    assert_eq!(
                        first.checksum, accepted.checksum,
                        "{} TXID {} was accepted with different content: {first_node} has {first:?}, {node} has {accepted:?}",
                        point.0, point.1
                    );
                    if first.epoch != accepted.epoch {
                        comparison.epoch_differences.push(format!(
                            "{} TXID {}: {first_node} has epoch {}, {node} has epoch {} (same checksum {:016x})",
                            point.0, point.1, first.epoch, accepted.epoch, accepted.checksum
                        ));
                    }
                    comparison.compared += 1;
                }
                None => {
                    seen.insert(point, (node, *accepted));
                }
            }
        }
    }
    comparison
}
