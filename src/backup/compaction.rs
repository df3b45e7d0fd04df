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
//! Cumulative objects (`backup::cumulative`) are built by the uploader; here
//! those no restore can use any more are deleted.
//!
//! Invariants: only runs of objects that follow each other (TXIDs and
//! checksums) are merged, so objects of a fenced old primary are never mixed
//! in; no merged object spans the end of a snapshot, so every snapshot stays
//! the start of a chain; sources are deleted only after the merged object is stored, and a
//! restore prefers the longer object, so a crash in between leaves a
//! restorable destination (the next run merges the leftovers again, to the
//! same name).

use std::collections::{BTreeMap, HashSet};
use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::layout::{self, ObjectKind, ObjectName, Point};
use super::restore::append_object;
use super::{BackupError, Destination};
use crate::store::cluster::unix_now_ms;

/// Merges what the windows that passed allow, and deletes the cumulative
/// objects no restore can use; returns the database's objects as they are
/// now.
pub async fn compact(
    destination: &Destination,
    database: &str,
    windows: &[Duration],
    grace: Duration,
    spool_dir: &Path,
) -> Result<Vec<ObjectName>, BackupError> {
    let mut objects: Vec<ObjectName> = destination
        .list(Some(database))
        .await?
        .into_iter()
        .map(|listed| listed.name)
        .collect();
    let now = unix_now_ms();
    let mut merged_objects = 0;
    for (index, window) in windows.iter().enumerate() {
        let level = index as u8 + 1;
        for run in runs_to_merge(&objects, level, *window, grace, now) {
            let merged = merge(destination, &run, level, spool_dir).await?;
            for source in &run {
                destination.delete(source).await?;
            }
            objects.retain(|object| !run.contains(object));
            objects.push(merged);
            merged_objects += 1;
        }
    }
    let unusable = unusable_cumulatives(&objects);
    for object in &unusable {
        destination.delete(object).await?;
    }
    objects.retain(|object| !unusable.contains(object));
    if merged_objects > 0 || !unusable.is_empty() {
        tracing::debug!(destination = %destination, database, merged_objects, deleted_cumulatives = unusable.len(), "compacted backup objects");
    }
    Ok(objects)
}

/// The runs of change objects below `level` that a level-`level` object of
/// `window` replaces now (Unix milliseconds `now_ms`): those whose last commit
/// falls in one window that ended at least `grace` ago, that follow each
/// other, split where a snapshot ends (so every snapshot stays the start of
/// a chain), each of at least two objects. No I/O (it only logs).
pub fn runs_to_merge(
    objects: &[ObjectName],
    level: u8,
    window: Duration,
    grace: Duration,
    now_ms: u64,
) -> Vec<Vec<ObjectName>> {
    let window_ms = (window.as_millis() as u64).max(1);
    let grace_ms = grace.as_millis() as u64;
    let snapshot_ends: HashSet<Point> = objects
        .iter()
        .filter(|object| object.kind == ObjectKind::Snapshot)
        .map(ObjectName::end)
        .collect();
    let mut slots: BTreeMap<u64, Vec<ObjectName>> = BTreeMap::new();
    for object in objects
        .iter()
        .filter(|object| object.kind == ObjectKind::Changes && object.level < level)
    {
        slots
            .entry(object.timestamp_ms / window_ms)
            .or_default()
            .push(object.clone());
    }
    let mut runs = Vec::new();
    for (slot, mut group) in slots {
        if group.len() < 2 || (slot + 1) * window_ms + grace_ms > now_ms {
            continue;
        }
        group.sort_by_key(|object| object.min_txid);
        if !follow_each_other(&group) {
            tracing::debug!(level, "not merging objects that do not follow each other");
            continue;
        }
        let mut run: Vec<ObjectName> = Vec::new();
        for object in group {
            if run
                .last()
                .is_some_and(|last| snapshot_ends.contains(&last.end()))
            {
                runs.push(std::mem::take(&mut run));
            }
            run.push(object);
        }
        runs.push(run);
    }
    runs.retain(|run| run.len() >= 2);
    runs
}

/// The cumulative objects no restore can use any more: those that do not
/// start and end where links of some chain end (compaction merged their
/// end's neighbours, or they belong to a history that lost), and those with
/// the same end as one that starts earlier. Pure.
pub fn unusable_cumulatives(objects: &[ObjectName]) -> Vec<ObjectName> {
    let ends: HashSet<Point> = layout::chains(objects)
        .iter()
        .flatten()
        .map(|link| link.end())
        .collect();
    let (usable, mut unusable): (Vec<&ObjectName>, Vec<&ObjectName>) = objects
        .iter()
        .filter(|object| object.kind == ObjectKind::Cumulative)
        .partition(|object| ends.contains(&object.start()) && ends.contains(&object.end()));
    unusable.extend(usable.iter().filter(|object| {
        usable.iter().any(|other| {
            other.end() == object.end()
                && (other.min_txid, other.level) < (object.min_txid, object.level)
        })
    }));
    unusable.into_iter().cloned().collect()
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
    use crate::ltx::TxId;

    #[test]
    fn the_next_run_is_after_the_next_boundary_of_the_shortest_window() {
        let windows = [Duration::from_secs(30), Duration::from_secs(300)];
        let grace = Duration::from_secs(2);
        assert_eq!(next_run_ms(61_000, &windows, grace), 92_000);
        assert_eq!(next_run_ms(90_000, &windows, grace), 122_000);
        assert_eq!(next_run_ms(5, &[], grace), u64::MAX);
    }

    fn object(kind: ObjectKind, range: (u64, u64), timestamp_ms: u64) -> ObjectName {
        layout::sample_object(kind, 0, range, timestamp_ms)
    }

    /// Regression: a merged object that spanned a snapshot's end left the
    /// snapshot the start of a chain of nothing, so once retention deleted
    /// the snapshot before it, the newest state restored only up to that
    /// snapshot.
    #[test]
    fn no_merged_object_spans_the_end_of_a_snapshot() {
        let mut objects = vec![
            object(ObjectKind::Snapshot, (1, 10), 10_000),
            object(ObjectKind::Changes, (11, 12), 11_000),
            object(ObjectKind::Changes, (13, 14), 12_000),
            object(ObjectKind::Snapshot, (1, 14), 12_500),
            object(ObjectKind::Changes, (15, 16), 13_000),
            object(ObjectKind::Changes, (17, 18), 14_000),
        ];
        let runs = runs_to_merge(&objects, 1, Duration::from_secs(30), Duration::ZERO, 60_000);
        let ranges: Vec<Vec<(u64, u64)>> = runs
            .iter()
            .map(|run| run.iter().map(|o| (o.min_txid.0, o.max_txid.0)).collect())
            .collect();
        assert_eq!(
            ranges,
            vec![vec![(11, 12), (13, 14)], vec![(15, 16), (17, 18)]]
        );
        for run in runs {
            objects.retain(|object| !run.contains(object));
            objects.push(ObjectName {
                level: 1,
                ..object(
                    ObjectKind::Changes,
                    (run[0].min_txid.0, run[run.len() - 1].max_txid.0),
                    run[run.len() - 1].timestamp_ms,
                )
            });
        }
        // Retention deletes the first snapshot and what it alone needed.
        objects.retain(|object| {
            object.max_txid.0 > 14 || object.min_txid.0 == 1 && object.max_txid.0 == 14
        });
        let plan = layout::plan("app.db", &objects, layout::Target::Latest).unwrap();
        assert_eq!(plan.objects.last().unwrap().max_txid, TxId(18));
    }

    #[test]
    fn cumulative_objects_off_every_chain_or_superseded_are_unusable() {
        let cumulative = |range, level| ObjectName {
            level,
            ..object(ObjectKind::Cumulative, range, 0)
        };
        let mut objects = vec![
            object(ObjectKind::Snapshot, (1, 10), 10_000),
            object(ObjectKind::Changes, (11, 20), 20_000),
            object(ObjectKind::Changes, (21, 30), 30_000),
            object(ObjectKind::Changes, (31, 40), 40_000),
        ];
        let kept = cumulative((11, 30), 3);
        let superseded = cumulative((21, 30), 1);
        let inside = cumulative((11, 25), 2);
        objects.extend([kept.clone(), superseded.clone(), inside.clone()]);
        let unusable = unusable_cumulatives(&objects);
        assert_eq!(unusable.len(), 2, "{unusable:?}");
        assert!(unusable.contains(&superseded) && unusable.contains(&inside));
    }
}
