//! Compaction: merging a destination's change objects level by level, so a
//! restore reads few objects.
//!
//! Level N has a time window (`backup.compaction-windows[N-1]`). Once a
//! window of level N has passed (plus a grace for uploads still under way),
//! the change objects of lower levels whose last commit falls in it are
//! concatenated, in TXID order, into one level-N object, and then deleted.
//! Objects are sequences of whole records, so the merged object still lets a
//! restore stop after any of its transactions.
//!
//! Invariants: only runs of objects that follow each other (TXIDs and
//! checksums) are merged, so objects of a fenced old primary are never mixed
//! in; sources are deleted only after the merged object is stored, and a
//! restore prefers the longer object, so a crash in between leaves a
//! restorable destination (the next run merges the leftovers again, to the
//! same name).

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::layout::{ObjectKind, ObjectName};
use super::restore::append_object;
use super::{BackupError, Destination};
use crate::store::cluster::unix_now_ms;

/// Merges what the windows that passed allow; returns how many merged objects
/// were written.
pub async fn compact(
    destination: &Destination,
    database: &str,
    windows: &[Duration],
    grace: Duration,
    spool_dir: &Path,
) -> Result<usize, BackupError> {
    let mut objects: Vec<ObjectName> = destination
        .list(Some(database))
        .await?
        .into_iter()
        .map(|listed| listed.name)
        .filter(|name| name.kind == ObjectKind::Changes)
        .collect();
    let now = unix_now_ms();
    let grace_ms = grace.as_millis() as u64;
    let mut merged_objects = 0;
    for (index, window) in windows.iter().enumerate() {
        let level = index as u8 + 1;
        let window_ms = (window.as_millis() as u64).max(1);
        let mut slots: BTreeMap<u64, Vec<ObjectName>> = BTreeMap::new();
        for object in objects.iter().filter(|object| object.level < level) {
            slots
                .entry(object.timestamp_ms / window_ms)
                .or_default()
                .push(object.clone());
        }
        for (slot, mut group) in slots {
            if group.len() < 2 || (slot + 1) * window_ms + grace_ms > now {
                continue;
            }
            group.sort_by_key(|object| object.min_txid);
            if !follow_each_other(&group) {
                tracing::debug!(
                    database,
                    level,
                    "not merging objects that do not follow each other"
                );
                continue;
            }
            let merged = merge(destination, &group, level, spool_dir).await?;
            for source in &group {
                destination.delete(source).await?;
            }
            objects.retain(|object| !group.contains(object));
            objects.push(merged);
            merged_objects += 1;
        }
    }
    if merged_objects > 0 {
        tracing::debug!(destination = %destination, database, merged_objects, "compacted backup objects");
    }
    Ok(merged_objects)
}

/// When compaction should look again after a run at `now_ms`: once the next
/// window of the shortest level has passed, plus the grace.
pub fn next_run_ms(now_ms: u64, windows: &[Duration], grace: Duration) -> u64 {
    match windows.first() {
        Some(window) => {
            let window_ms = (window.as_millis() as u64).max(1);
            (now_ms / window_ms + 1) * window_ms + grace.as_millis() as u64
        }
        None => u64::MAX,
    }
}

/// Whether each object starts where the previous one ended.
fn follow_each_other(group: &[ObjectName]) -> bool {
    group.windows(2).all(|pair| {
        pair[1].min_txid.0 == pair[0].max_txid.0 + 1 && pair[1].pre_apply == pair[0].post_apply
    })
}

/// Concatenates `group` (consecutive) into one level-`level` object, spooled
/// through a file in `spool_dir`, and stores it.
async fn merge(
    destination: &Destination,
    group: &[ObjectName],
    level: u8,
    spool_dir: &Path,
) -> Result<ObjectName, BackupError> {
    let mut spool = tempfile::tempfile_in(spool_dir)
        .map_err(|error| BackupError::local("spool a merged object", error))?;
    let mut digest = Sha256::new();
    for source in group {
        append_object(destination, source, &mut spool, Some(&mut digest)).await?;
    }
    let size = spool
        .seek(SeekFrom::End(0))
        .and_then(|size| spool.rewind().map(|()| size))
        .map_err(|error| BackupError::local("spool a merged object", error))?;
    let (first, last) = (&group[0], &group[group.len() - 1]);
    let merged = ObjectName {
        database: first.database.clone(),
        kind: ObjectKind::Changes,
        level,
        min_txid: first.min_txid,
        max_txid: last.max_txid,
        epoch: group.iter().map(|object| object.epoch).max().unwrap_or(0),
        pre_apply: first.pre_apply,
        post_apply: last.post_apply,
        timestamp_ms: last.timestamp_ms,
        sha256: digest.finalize().into(),
    };
    destination.put_spooled(&merged, spool, size).await?;
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_run_is_after_the_next_boundary_of_the_shortest_window() {
        let windows = [Duration::from_secs(30), Duration::from_secs(300)];
        let grace = Duration::from_secs(2);
        assert_eq!(next_run_ms(61_000, &windows, grace), 92_000);
        assert_eq!(next_run_ms(90_000, &windows, grace), 122_000);
        assert_eq!(next_run_ms(5, &[], grace), u64::MAX);
    }
}
