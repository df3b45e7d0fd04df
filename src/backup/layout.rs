//! The remote layout: object names, the framing inside an object, and which
//! objects a restore reads. Pure: no I/O.
//!
//! Every object of a database lives under `<prefix>/<database>/` and is named
//! by everything a restore needs to plan with a listing alone:
//!
//! ```text
//! <database>/<kind>/<min txid>-<max txid>_<epoch>_<pre>_<post>_<time>_<sha256>.ltx
//! ```
//!
//! `kind` is `changes` (the change sets of one sync interval), `changes1` to
//! `changes9` (objects merged by compaction, level by level) or `snapshots`
//! (the whole database); TXIDs, the lease epoch, the pre- and post-apply
//! checksums and the commit time of the last transaction (Unix milliseconds)
//! are 16 hex digits; `sha256` is the object's SHA-256 in 64 hex digits. The
//! listing is the manifest: names are immutable (written with conditional
//! puts) and each one carries its object's digest.
//!
//! An object is a sequence of records, each a big-endian `u64` length and
//! one LTX file, oldest first: a restore can stop after any transaction, not
//! only at object boundaries. A snapshot object holds one snapshot record.
//!
//! Invariants: names parse back to what formatted them; a restore plan is a
//! chain where each object starts at the TXID after the previous one's end
//! with a pre-apply checksum equal to its post-apply checksum, and the lease
//! epoch never goes down along it (a fenced old primary's late objects lose
//! to its successor's).

use std::collections::HashMap;
use std::fmt;

use crate::ltx::{Checksum, TxId};

/// The two kinds of object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// Consecutive change sets: those of one sync interval (level 0), or
    /// several such objects merged by compaction (levels 1 to
    /// [`MAX_LEVEL`]).
    Changes,
    /// A snapshot of the whole database.
    Snapshot,
    /// The pages a run of transactions changed, merged into one record (the
    /// newest version of each page): a restore applies it whole to jump from
    /// its first TXID to its last. Level N (1 to [`MAX_LEVEL`]) ends where a
    /// window of `backup.compaction-windows[N-1]` ended and starts where the
    /// enclosing window of the next level began (the snapshot, for the
    /// highest level); see `backup::cumulative`.
    Cumulative,
}

/// The highest compaction level.
pub const MAX_LEVEL: u8 = crate::config::MAX_BACKUP_COMPACTION_WINDOWS as u8;

/// The folder of objects of `kind` at `level` under a database: `snapshots`,
/// `changes` (level 0), `changes1` to `changes9`, or `cumulative1` to
/// `cumulative9`.
fn folder(kind: ObjectKind, level: u8) -> String {
    match (kind, level) {
        (ObjectKind::Snapshot, _) => "snapshots".to_string(),
        (ObjectKind::Changes, 0) => "changes".to_string(),
        (ObjectKind::Changes, level) => format!("changes{level}"),
        (ObjectKind::Cumulative, level) => format!("cumulative{level}"),
    }
}

/// The folders of one database's objects in the order a listing visits
/// them: change objects level by level, then cumulative objects, then
/// snapshots. Compaction deletes change objects only after storing the
/// object that merges them one level up, and retention deletes objects only
/// behind a snapshot, so an object deleted while a listing runs was replaced
/// before in a folder visited later: the listing holds every TXID the
/// destination held when it began. The names also sort in this order (as
/// S3, GCS and Azure list keys).
pub fn folders_in_listing_order() -> impl Iterator<Item = String> {
    let changes = (0..=MAX_LEVEL).map(|level| folder(ObjectKind::Changes, level));
    let cumulative = (1..=MAX_LEVEL).map(|level| folder(ObjectKind::Cumulative, level));
    changes
        .chain(cumulative)
        .chain(std::iter::once(folder(ObjectKind::Snapshot, 0)))
}

fn from_folder(folder: &str) -> Option<(ObjectKind, u8)> {
    let leveled = |kind, digits: &str| {
        let level: u8 = digits.parse().ok()?;
        (1..=MAX_LEVEL).contains(&level).then_some((kind, level))
    };
    match folder {
        "snapshots" => Some((ObjectKind::Snapshot, 0)),
        "changes" => Some((ObjectKind::Changes, 0)),
        _ => match folder.strip_prefix("cumulative") {
            Some(digits) => leveled(ObjectKind::Cumulative, digits),
            None => leveled(ObjectKind::Changes, folder.strip_prefix("changes")?),
        },
    }
}

/// Everything an object's name says about it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectName {
    /// The database it belongs to.
    pub database: String,
    /// Changes, cumulative or snapshot.
    pub kind: ObjectKind,
    /// The compaction level of a changes object (0 for snapshots).
    pub level: u8,
    /// The first TXID it holds (1 for a snapshot).
    pub min_txid: TxId,
    /// The last TXID it holds.
    pub max_txid: TxId,
    /// The lease epoch of the primary that wrote it.
    pub epoch: u64,
    /// The database checksum before its first transaction (zero for a
    /// snapshot).
    pub pre_apply: Checksum,
    /// The database checksum after its last transaction.
    pub post_apply: Checksum,
    /// The commit time of its last transaction, Unix milliseconds.
    pub timestamp_ms: u64,
    /// The SHA-256 of the whole object.
    pub sha256: [u8; 32],
}

/// Why a name is not an object name of this layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` is not a backup object name: {reason}")]
pub struct NameError {
    /// The name as found.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl ObjectName {
    /// The object's path relative to the destination's prefix.
    pub fn path(&self) -> String {
        format!(
            "{}/{}/{:016x}-{:016x}_{:016x}_{:016x}_{:016x}_{:016x}_{}.ltx",
            self.database,
            folder(self.kind, self.level),
            self.min_txid.0,
            self.max_txid.0,
            self.epoch,
            self.pre_apply.0,
            self.post_apply.0,
            self.timestamp_ms,
            crate::hex::encode(&self.sha256)
        )
    }

    /// Parses a path made by [`ObjectName::path`].
    pub fn parse(path: &str) -> Result<ObjectName, NameError> {
        let error = |reason| NameError {
            name: path.to_string(),
            reason,
        };
        let mut parts = path.rsplitn(3, '/');
        let file = parts.next().ok_or_else(|| error("no file name"))?;
        let folder = parts.next().ok_or_else(|| error("no kind folder"))?;
        let database = parts.next().ok_or_else(|| error("no database folder"))?;
        if database.is_empty() || database.contains('/') {
            return Err(error("the database folder is empty or nested"));
        }
        let (kind, level) = from_folder(folder).ok_or_else(|| {
            error(
                "the kind folder is not `snapshots`, `changes`, `changes1` to `changes9` \
                 or `cumulative1` to `cumulative9`",
            )
        })?;
        let stem = file
            .strip_suffix(".ltx")
            .ok_or_else(|| error("it does not end in `.ltx`"))?;
        let fields: Vec<&str> = stem.split('_').collect();
        let [range, epoch, pre, post, time, sha] = fields[..] else {
            return Err(error("it does not have six `_`-separated fields"));
        };
        let (min, max) = range
            .split_once('-')
            .ok_or_else(|| error("the TXID range has no `-`"))?;
        let number = |text: &str| {
            if text.len() != 16 {
                return Err(error("a number is not 16 hex digits"));
            }
            u64::from_str_radix(text, 16).map_err(|_| error("a number is not hexadecimal"))
        };
        let sha256 = crate::hex::decode(sha)
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| error("the SHA-256 is not 64 hex digits"))?;
        let name = ObjectName {
            database: database.to_string(),
            kind,
            level,
            min_txid: TxId(number(min)?),
            max_txid: TxId(number(max)?),
            epoch: number(epoch)?,
            pre_apply: Checksum(number(pre)?),
            post_apply: Checksum(number(post)?),
            timestamp_ms: number(time)?,
            sha256,
        };
        if name.min_txid.0 == 0 || name.min_txid > name.max_txid {
            return Err(error("the TXID range is empty or starts at zero"));
        }
        if (kind == ObjectKind::Snapshot) != (name.min_txid.0 == 1) {
            return Err(error("snapshots, and only they, start at TXID 1"));
        }
        Ok(name)
    }
}

/// A point in a database's history: a TXID and the database's checksum right
/// after it.
pub type Point = (TxId, Checksum);

impl ObjectName {
    /// The point it applies to: the TXID before its first one and the
    /// checksum there (TXID 0 and a zero checksum for a snapshot).
    pub fn start(&self) -> Point {
        (TxId(self.min_txid.0 - 1), self.pre_apply)
    }

    /// The point it leaves the database at.
    pub fn end(&self) -> Point {
        (self.max_txid, self.post_apply)
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.path())
    }
}

/// The framing of records inside an object: a big-endian `u64` length, then
/// that many bytes of one LTX file.
pub const RECORD_LENGTH_BYTES: usize = 8;

/// Appends one framed record to `out`.
pub fn frame_record(out: &mut Vec<u8>, ltx: &[u8]) {
    out.extend_from_slice(&(ltx.len() as u64).to_be_bytes());
    out.extend_from_slice(ltx);
}

/// What a restore asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The newest state.
    Latest,
    /// The state right after this TXID.
    TxId(TxId),
    /// The state after the last transaction committed at or before this
    /// time (Unix milliseconds).
    Time(u64),
}

/// Objects to read, in order, and where to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    /// A snapshot, then change objects, each following the previous one.
    pub objects: Vec<ObjectName>,
    /// The target, for the last object (which may be applied only in part).
    pub target: Target,
}

/// Why no plan reaches the target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The database has no snapshot to start from.
    #[error("the backup of `{0}` has no snapshot to start from")]
    NoSnapshot(String),
    /// An object the newest history needs is missing: one after the chain's
    /// end follows no object.
    #[error(
        "the backup of `{database}` is missing an object after TXID {after}: nothing leads to {object} \
         (restorable up to TXID {after}; pass --txid {after} to restore that)"
    )]
    Gap {
        /// The database.
        database: String,
        /// Where the restorable history ends.
        after: TxId,
        /// The first object that follows nothing.
        object: String,
    },
    /// No chain reaches the target.
    #[error("the backup of `{database}` cannot reach {target}: {detail}")]
    Unreachable {
        /// The database.
        database: String,
        /// The target, in words.
        target: String,
        /// The restorable range, in words.
        detail: String,
    },
}

/// The chain from `snapshot` on: at each step, of the objects that follow, the
/// one of the highest epoch, then the longest. Where two primaries wrote
/// different objects after the same point, the later lease wins; an object of
/// a lower epoch is followed only when nothing else follows (a history
/// restored into a cluster whose lease counts from 1 again continues it).
pub fn chain_from<'a>(snapshot: &'a ObjectName, changes: &'a [ObjectName]) -> Vec<&'a ObjectName> {
    let mut chain = vec![snapshot];
    let mut current = snapshot;
    loop {
        let next = changes
            .iter()
            .filter(|object| {
                object.min_txid.0 == current.max_txid.0 + 1
                    && object.pre_apply == current.post_apply
            })
            .max_by_key(|object| (object.epoch, object.max_txid));
        match next {
            Some(object) => {
                chain.push(object);
                current = object;
            }
            None => return chain,
        }
    }
}

/// The fewest objects that take a database from the end of `chain[0]` (its
/// snapshot) to the end of `chain[upto]`: links of the chain, and cumulative
/// objects of `objects` that start and end where links of the chain end.
/// Where a cumulative object saves nothing, the chain's links are taken.
pub fn shortest_path<'a>(
    chain: &[&'a ObjectName],
    upto: usize,
    objects: &'a [ObjectName],
) -> Vec<&'a ObjectName> {
    let node: HashMap<Point, usize> = chain[..=upto]
        .iter()
        .enumerate()
        .map(|(index, link)| (link.end(), index))
        .collect();
    let mut jumps: HashMap<usize, Vec<(usize, &ObjectName)>> = HashMap::new();
    for object in objects
        .iter()
        .filter(|object| object.kind == ObjectKind::Cumulative)
    {
        if let (Some(&from), Some(&to)) = (node.get(&object.start()), node.get(&object.end()))
            && from < to
        {
            jumps.entry(to).or_default().push((from, object));
        }
    }
    // `best[i]`: the fewest objects after the snapshot that reach node i, and
    // the step that does it last.
    let mut best: Vec<(usize, usize, &ObjectName)> = vec![(0, 0, chain[0])];
    for index in 1..=upto {
        let mut step = (best[index - 1].0 + 1, index - 1, chain[index]);
        for &(from, object) in jumps.get(&index).into_iter().flatten() {
            if best[from].0 + 1 < step.0 {
                step = (best[from].0 + 1, from, object);
            }
        }
        best.push(step);
    }
    let mut path = Vec::with_capacity(best[upto].0 + 1);
    let mut index = upto;
    while index > 0 {
        let (_, from, object) = best[index];
        path.push(object);
        index = from;
    }
    path.push(chain[0]);
    path.reverse();
    path
}

/// The restorable chains of one database's objects: one per snapshot, as far
/// as it goes. Ordered so the best end comes last: the highest epoch, then
/// the latest commit (a history that started again from TXID 1 in the same
/// epoch, as after a data dir was lost, is newer than the one it replaced),
/// then the highest TXID, then the fewest objects.
pub fn chains(objects: &[ObjectName]) -> Vec<Vec<&ObjectName>> {
    let changes: Vec<ObjectName> = objects
        .iter()
        .filter(|object| object.kind == ObjectKind::Changes)
        .cloned()
        .collect();
    let mut chains: Vec<Vec<&ObjectName>> = objects
        .iter()
        .filter(|object| object.kind == ObjectKind::Snapshot)
        .map(|snapshot| {
            chain_from(snapshot, &changes)
                .into_iter()
                .map(|link| {
                    objects
                        .iter()
                        .find(|object| *object == link)
                        .expect("every link is one of the objects")
                })
                .collect()
        })
        .collect();
    chains.sort_by_key(|chain| {
        let end = chain.last().expect("a chain starts with its snapshot");
        (
            end.epoch,
            end.timestamp_ms,
            end.max_txid,
            std::cmp::Reverse(chain.len()),
        )
    });
    chains
}

/// Plans a restore of one database's objects (all of one database) to
/// `target`: the shortest chain from a snapshot that reaches it.
pub fn plan(
    database: &str,
    objects: &[ObjectName],
    target: Target,
) -> Result<RestorePlan, PlanError> {
    let chains = chains(objects);
    if chains.is_empty() {
        return Err(PlanError::NoSnapshot(database.to_string()));
    }
    let unreachable = |target: String| {
        let best = chains.last().expect("not empty");
        let (first, last) = (best[0], best[best.len() - 1]);
        PlanError::Unreachable {
            database: database.to_string(),
            target,
            detail: format!(
                "restorable are TXIDs {} to {} (commit times {} to {})",
                first.max_txid,
                last.max_txid,
                crate::ltx::format_timestamp_millis(first.timestamp_ms),
                crate::ltx::format_timestamp_millis(last.timestamp_ms)
            ),
        }
    };
    // The first `keep` links of `chain`, by the shortest path: the last link
    // is applied whole unless the target lies inside it, and then it must be
    // read, since only its records can stop short of its end.
    let cut = |chain: &[&ObjectName], keep: usize| {
        let last = chain[keep - 1];
        let whole = match target {
            Target::Latest => true,
            Target::TxId(txid) => last.max_txid == txid,
            Target::Time(millis) => last.timestamp_ms <= millis,
        };
        let path = if whole || keep == 1 {
            shortest_path(chain, keep - 1, objects)
        } else {
            let mut path = shortest_path(chain, keep - 2, objects);
            path.push(last);
            path
        };
        RestorePlan {
            objects: path.into_iter().cloned().collect(),
            target,
        }
    };
    let gap = |chain: &[&ObjectName]| {
        let end = chain.last().expect("a chain starts with its snapshot");
        first_orphan(objects)
            .filter(|orphan| orphan.min_txid > end.max_txid)
            .map(|orphan| PlanError::Gap {
                database: database.to_string(),
                after: end.max_txid,
                object: orphan.path(),
            })
    };
    match target {
        Target::Latest => {
            let best = chains.last().expect("not empty");
            match gap(best) {
                Some(error) => Err(error),
                None => Ok(cut(best, best.len())),
            }
        }
        Target::TxId(txid) => {
            // The best chain that holds the TXID, from its newest snapshot at
            // or before it.
            chains
                .iter()
                .rev()
                .filter(|chain| chain[0].max_txid <= txid)
                .filter_map(|chain| {
                    let keep = chain.iter().position(|object| object.max_txid >= txid)? + 1;
                    Some((chain, keep))
                })
                .max_by_key(|(chain, _)| (chain[0].max_txid, chain.last().map(|o| o.epoch)))
                .map(|(chain, keep)| cut(chain, keep))
                .ok_or_else(|| unreachable(format!("TXID {txid}")))
        }
        Target::Time(millis) => chains
            .iter()
            .rev()
            .filter(|chain| chain[0].timestamp_ms <= millis)
            .map(|chain| {
                // Every object up to the first that ends after the time; that
                // one is applied only up to the time.
                let keep = chain
                    .iter()
                    .position(|object| object.timestamp_ms > millis)
                    .map_or(chain.len(), |index| index + 1);
                (chain, keep)
            })
            .max_by_key(|(chain, _)| (chain[0].timestamp_ms, chain.last().map(|o| o.epoch)))
            .ok_or_else(|| unreachable(crate::ltx::format_timestamp_millis(millis).to_string()))
            .and_then(|(chain, keep)| {
                let ends_before = chain.last().is_some_and(|end| end.timestamp_ms <= millis);
                match gap(chain) {
                    // The chain ends before the time, and later objects exist
                    // past a missing one.
                    Some(error) if ends_before => Err(error),
                    _ => Ok(cut(chain, keep)),
                }
            }),
    }
}

/// The first changes object (by TXID) that follows no other object and no
/// snapshot: one before it is missing. Objects that start at or before the
/// oldest snapshot's end are not counted, since retention deletes what came
/// before a snapshot.
pub fn first_orphan(objects: &[ObjectName]) -> Option<&ObjectName> {
    let oldest_snapshot_end = objects
        .iter()
        .filter(|object| object.kind == ObjectKind::Snapshot)
        .map(|object| object.max_txid)
        .min()?;
    objects
        .iter()
        .filter(|object| {
            object.kind == ObjectKind::Changes && object.min_txid > oldest_snapshot_end
        })
        .filter(|object| {
            !objects.iter().any(|before| {
                before.kind != ObjectKind::Cumulative && before.end() == object.start()
            })
        })
        .min_by_key(|object| object.min_txid)
}

/// An object of a history whose checksum after TXID `n` is `n`, for tests.
#[cfg(test)]
pub(crate) fn sample_object(
    kind: ObjectKind,
    level: u8,
    range: (u64, u64),
    timestamp_ms: u64,
) -> ObjectName {
    ObjectName {
        database: "app.db".into(),
        kind,
        level,
        min_txid: TxId(range.0),
        max_txid: TxId(range.1),
        epoch: 1,
        pre_apply: Checksum(if kind == ObjectKind::Snapshot {
            0
        } else {
            range.0 - 1
        }),
        post_apply: Checksum(range.1),
        timestamp_ms,
        sha256: [0; 32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any object name, and any valid one with a character replaced, parses
        /// or is refused, never a panic; what parses names itself the same way.
        #[test]
        fn prop_any_object_name_parses_or_is_refused(
            path in "\\PC{0,160}",
            at in proptest::prelude::any::<proptest::sample::Index>(),
            replacement in proptest::prelude::any::<char>(),
        ) {
            let valid = object(ObjectKind::Changes, (5, 9), 3, 11, 12).path();
            let mut chars: Vec<char> = valid.chars().collect();
            let index = at.index(chars.len());
            chars[index] = replacement;
            let mutated: String = chars.into_iter().collect();
            for candidate in [path, mutated] {
                if let Ok(name) = ObjectName::parse(&candidate) {
                    proptest::prop_assert_eq!(ObjectName::parse(&name.to_string()), Ok(name));
                }
            }
        }
    }

    fn object(kind: ObjectKind, range: (u64, u64), epoch: u64, pre: u64, post: u64) -> ObjectName {
        ObjectName {
            database: "app.db".into(),
            kind,
            level: 0,
            min_txid: TxId(range.0),
            max_txid: TxId(range.1),
            epoch,
            pre_apply: Checksum(pre),
            post_apply: Checksum(post),
            timestamp_ms: range.1 * 1000,
            sha256: [7; 32],
        }
    }

    const C: u64 = 1 << 63;

    #[test]
    fn folders_are_listed_after_those_whose_objects_they_replace_and_sort_so() {
        let folders: Vec<String> = folders_in_listing_order().collect();
        assert_eq!(folders.len(), 2 * MAX_LEVEL as usize + 2);
        let position = |kind, level| {
            let wanted = folder(kind, level);
            folders.iter().position(|name| *name == wanted).unwrap()
        };
        for level in 1..=MAX_LEVEL {
            assert!(
                position(ObjectKind::Changes, level - 1) < position(ObjectKind::Changes, level)
            );
        }
        assert_eq!(folders.last().unwrap(), "snapshots");
        let mut keys: Vec<String> = folders.iter().map(|name| format!("{name}/")).collect();
        keys.sort();
        let in_order: Vec<String> = folders.iter().map(|name| format!("{name}/")).collect();
        assert_eq!(keys, in_order, "key order differs from listing order");
    }

    #[test]
    fn names_round_trip_and_bad_names_say_why() {
        let name = object(ObjectKind::Changes, (5, 9), 3, C | 1, C | 2);
        assert_eq!(ObjectName::parse(&name.path()).unwrap(), name);
        let snapshot = object(ObjectKind::Snapshot, (1, 9), 3, 0, C | 2);
        assert_eq!(ObjectName::parse(&snapshot.path()).unwrap(), snapshot);
        let compacted = ObjectName {
            level: 3,
            ..name.clone()
        };
        assert!(compacted.path().contains("/changes3/"));
        assert_eq!(ObjectName::parse(&compacted.path()).unwrap(), compacted);
        for bad in [
            "app.db/changes/x.ltx",
            "app.db/other/0000000000000001-0000000000000001_0_0_0_0_00.ltx",
            "changes/0000000000000001-0000000000000001.ltx",
            &object(ObjectKind::Changes, (1, 9), 3, 0, C).path(),
            &name.path().replace(".ltx", ".bin"),
            &name.path().replace("/changes/", "/changes0/"),
            &name.path().replace("/changes/", "/changes10/"),
            &name.path().replace("_0707", "_z707"),
        ] {
            assert!(ObjectName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_latest_plan_follows_checksums_and_prefers_the_newer_epoch() {
        let objects = vec![
            object(ObjectKind::Snapshot, (1, 10), 1, 0, C | 10),
            object(ObjectKind::Changes, (11, 12), 1, C | 10, C | 12),
            // An old primary, cut off, kept uploading after 12...
            object(ObjectKind::Changes, (13, 20), 1, C | 12, C | 99),
            // ...while its successor went on from 12 under epoch 2.
            object(ObjectKind::Changes, (13, 14), 2, C | 12, C | 14),
            object(ObjectKind::Changes, (15, 15), 2, C | 14, C | 15),
        ];
        let plan = plan("app.db", &objects, Target::Latest).unwrap();
        let ends: Vec<(u64, u64)> = plan
            .objects
            .iter()
            .map(|o| (o.max_txid.0, o.epoch))
            .collect();
        assert_eq!(ends, vec![(10, 1), (12, 1), (14, 2), (15, 2)]);

        // Restored into a cluster whose lease counts from 1 again: the lower
        // epoch continues the chain, since nothing else follows.
        let mut restored = objects.clone();
        restored.push(object(ObjectKind::Changes, (16, 18), 1, C | 15, C | 18));
        let continued = super::plan("app.db", &restored, Target::Latest).unwrap();
        assert_eq!(continued.objects.last().unwrap().max_txid, TxId(18));
    }

    #[test]
    fn txid_and_time_plans_stop_at_the_object_that_holds_the_target() {
        let objects = vec![
            object(ObjectKind::Snapshot, (1, 10), 1, 0, C | 10),
            object(ObjectKind::Changes, (11, 15), 1, C | 10, C | 15),
            object(ObjectKind::Changes, (16, 20), 1, C | 15, C | 20),
            object(ObjectKind::Snapshot, (1, 20), 1, 0, C | 20),
            object(ObjectKind::Changes, (21, 30), 1, C | 20, C | 30),
        ];
        let plan_for = |target| {
            plan("app.db", &objects, target)
                .unwrap()
                .objects
                .iter()
                .map(|o| (o.min_txid.0, o.max_txid.0))
                .collect::<Vec<_>>()
        };
        assert_eq!(plan_for(Target::TxId(TxId(13))), vec![(1, 10), (11, 15)]);
        assert_eq!(plan_for(Target::TxId(TxId(25))), vec![(1, 20), (21, 30)]);
        assert_eq!(
            plan_for(Target::Time(17_500)),
            vec![(1, 10), (11, 15), (16, 20)]
        );
        // The object after the snapshot may hold commits up to the time; the
        // restore reads it and applies none that came later.
        assert_eq!(plan_for(Target::Time(20_000)), vec![(1, 20), (21, 30)]);
        assert!(matches!(
            plan("app.db", &objects, Target::TxId(TxId(31))),
            Err(PlanError::Unreachable { .. })
        ));
        assert!(matches!(
            plan("app.db", &objects, Target::Time(5_000)),
            Err(PlanError::Unreachable { .. })
        ));
        assert_eq!(
            plan("app.db", &objects[1..3], Target::Latest),
            Err(PlanError::NoSnapshot("app.db".into()))
        );
        // Object 16-20 is lost: the newest state cannot be restored, and the
        // error names the first object past the gap; earlier TXIDs still can.
        let mut damaged = objects.clone();
        damaged.retain(|object| object.min_txid != TxId(16));
        damaged.retain(|object| object.max_txid != TxId(20) || object.kind != ObjectKind::Snapshot);
        match plan("app.db", &damaged, Target::Latest) {
            Err(PlanError::Gap { after, object, .. }) => {
                assert_eq!(after, TxId(15));
                assert!(
                    object.contains("0000000000000015-000000000000001e"),
                    "{object}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan("app.db", &damaged, Target::Time(40_000)),
            Err(PlanError::Gap { .. })
        ));
        assert!(plan("app.db", &damaged, Target::TxId(TxId(14))).is_ok());
        assert!(plan("app.db", &damaged, Target::Time(12_000)).is_ok());
    }

    #[test]
    fn cumulative_objects_shorten_plans_where_they_start_and_end_on_the_chain() {
        let mut objects = vec![object(ObjectKind::Snapshot, (1, 10), 1, 0, C | 10)];
        for start in [11, 21, 31, 41] {
            objects.push(object(
                ObjectKind::Changes,
                (start, start + 9),
                1,
                C | (start - 1),
                C | (start + 9),
            ));
        }
        let jump = ObjectName {
            kind: ObjectKind::Cumulative,
            level: 2,
            ..object(ObjectKind::Changes, (11, 40), 1, C | 10, C | 40)
        };
        // Another history's jump: it ends at a checksum the chain never had.
        let stray = ObjectName {
            kind: ObjectKind::Cumulative,
            level: 3,
            ..object(ObjectKind::Changes, (11, 50), 1, C | 10, C | 999)
        };
        objects.push(jump.clone());
        objects.push(stray);
        let ranges = |target| {
            plan("app.db", &objects, target)
                .unwrap()
                .objects
                .iter()
                .map(|o| (o.kind, o.min_txid.0, o.max_txid.0))
                .collect::<Vec<_>>()
        };
        let snapshot = (ObjectKind::Snapshot, 1, 10);
        let jumped = (ObjectKind::Cumulative, 11, 40);
        let last = (ObjectKind::Changes, 41, 50);
        assert_eq!(ranges(Target::Latest), vec![snapshot, jumped, last]);
        assert_eq!(ranges(Target::TxId(TxId(45))), vec![snapshot, jumped, last]);
        assert_eq!(ranges(Target::TxId(TxId(40))), vec![snapshot, jumped]);
        assert_eq!(ranges(Target::Time(47_000)), vec![snapshot, jumped, last]);
        // A target inside the jump's range needs the records that hold it.
        assert_eq!(
            ranges(Target::TxId(TxId(35))),
            vec![
                snapshot,
                (ObjectKind::Changes, 11, 20),
                (ObjectKind::Changes, 21, 30),
                (ObjectKind::Changes, 31, 40)
            ]
        );
        // A jump is never the start of a chain, nor what marks a gap filled.
        objects.retain(|object| object.min_txid != TxId(31) || object.kind != ObjectKind::Changes);
        assert!(matches!(
            plan("app.db", &objects, Target::Latest),
            Err(PlanError::Gap { after, .. }) if after == TxId(30)
        ));
    }
}
