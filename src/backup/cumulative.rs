//! Cumulative objects: jumps over a database's history, so a restore of any
//! moment reads a few objects whatever the history's length.
//!
//! Change objects keep every transaction (a restore can stop after any), so a
//! restore that follows them reads one per window of each compaction level:
//! with the default windows, up to about 75 objects a day. A cumulative
//! object of level N holds, as one record, the newest version of every page
//! changed from where the enclosing window of level N+1 began (the snapshot,
//! for the highest level) to where a window of level N ended. A restore of
//! the newest state then reads the snapshot, one cumulative object per level
//! and the change objects of the last, unfinished window of level 1; a
//! restore of an older moment, the snapshot, the cumulative objects up to it
//! and the one change object that holds it.
//!
//! [`needed`] says, from a listing, which cumulative objects the newest chain
//! lacks (pure). [`Builder`] builds them on the primary from what it holds in
//! plain text: the cumulative records it built before (kept in its data dir,
//! so a restart goes on from them) and its change-set log. When neither
//! reaches back far enough (a new primary) or one would
//! exceed [`MAX_CUMULATIVE_PAGE_BYTES`], it says so, and the uploader uploads
//! a snapshot instead (at most once per window of the highest level), from
//! which new cumulative objects start.
//!
//! Invariants: a cumulative object starts and ends where links of a chain
//! end, so a restore can check it like any other object (pre- and post-apply
//! checksums); it is built from the primary's own log, never from objects it
//! cannot decrypt; its memory is bounded by the page limit.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;

use sha2::Digest;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::BackupError;
use super::encryption::Recipients;
use super::layout::{self, ObjectKind, ObjectName, Point};
use crate::ltx::{self, Header, LtxError, TxId};
use crate::store::{CatchUp, Database, Position};

/// The most page bytes one cumulative object holds; past it, a snapshot is
/// uploaded instead.
pub const MAX_CUMULATIVE_PAGE_BYTES: u64 = 64 * 1024 * 1024;
/// The most change-set bytes a cumulative object is built from, on top of the
/// cumulative objects it continues.
pub const MAX_CUMULATIVE_LOG_BYTES: u64 = 64 * 1024 * 1024;

/// A cumulative object the newest chain lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needed {
    /// Its level (1 to the number of compaction windows).
    pub level: u8,
    /// Where it starts: the snapshot's end or the end of a window of a
    /// higher level.
    pub start: Point,
    /// Where it ends: the end of the last change object of a window of its
    /// level.
    pub end: Point,
}

/// The cumulative objects that the newest chain of `objects` (one database's
/// listing) lacks at `now_ms`, oldest end first. Pure.
///
/// The chain's links end at window boundaries: the boundary after link `i`
/// is of level N when links `i` and `i + 1` committed last in different
/// windows of level N (for the last link: when its window of level N ended
/// at least `grace` ago). Each boundary of level N ≥ 1 needs a cumulative
/// object from the last boundary of a higher level (or the snapshot) unless
/// a single link already spans that.
pub fn needed(
    objects: &[ObjectName],
    windows: &[Duration],
    grace: Duration,
    now_ms: u64,
) -> Vec<Needed> {
    let chains = layout::chains(objects);
    let Some(chain) = chains.last() else {
        return Vec::new();
    };
    let top = windows.len() as u8;
    let window_ms: Vec<u64> = windows
        .iter()
        .map(|window| (window.as_millis() as u64).max(1))
        .collect();
    let grace_ms = grace.as_millis() as u64;
    let level_after = |index: usize| -> u8 {
        let time = chain[index].timestamp_ms;
        let mut level = 0;
        for (number, &window) in window_ms.iter().enumerate() {
            let ended = match chain.get(index + 1) {
                Some(next) => next.timestamp_ms / window != time / window,
                None => (time / window + 1) * window + grace_ms <= now_ms,
            };
            if ended {
                level = number as u8 + 1;
            }
        }
        level
    };
    let levels: Vec<u8> = (0..chain.len())
        .map(|index| {
            if index == 0 {
                u8::MAX
            } else {
                level_after(index)
            }
        })
        .collect();
    let existing: Vec<&ObjectName> = objects
        .iter()
        .filter(|object| object.kind == ObjectKind::Cumulative)
        .collect();
    let mut wanted = Vec::new();
    for index in 1..chain.len() {
        let level = levels[index];
        if level == 0 {
            continue;
        }
        let base = if level >= top {
            0
        } else {
            (0..index)
                .rev()
                .find(|&before| levels[before] > level)
                .unwrap_or(0)
        };
        if base + 1 >= index {
            continue;
        }
        let (start, end) = (chain[base].end(), chain[index].end());
        let covered = existing
            .iter()
            .any(|object| object.end() == end && object.start() == start);
        if !covered {
            wanted.push(Needed { level, start, end });
        }
    }
    wanted
}

/// Builds cumulative objects on the primary from the ones it built before
/// and its change-set log. Blocking: use it on the blocking pool.
#[derive(Debug)]
pub struct Builder {
    /// Where objects are spooled (the data dir).
    spool_dir: PathBuf,
    /// Whom objects are sealed to, if anyone.
    recipients: Option<Recipients>,
    /// Where it keeps, in plain text, the newest cumulative record built
    /// from each start (one LTX file each, named by its TXID range), so a
    /// restart continues from them.
    dir: PathBuf,
    /// Those records by start: their end and file.
    built: HashMap<Point, (Point, PathBuf)>,
    /// The objects it could not build, not to be tried again.
    failed: HashSet<(Point, Point)>,
}

/// Why a cumulative object cannot be built here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unbuildable {
    /// Neither what this node built before nor its log reaches back to the
    /// object's start.
    NotInLog,
    /// It would hold more than [`MAX_CUMULATIVE_PAGE_BYTES`] of pages.
    TooLarge,
}

/// A cumulative object ready to upload: its name and the spool file (rewound)
/// that holds it, with its size.
#[derive(Debug)]
pub struct Built {
    /// The object's name.
    pub name: ObjectName,
    /// The object's bytes.
    pub file: File,
    /// How many.
    pub size: u64,
}

impl Builder {
    /// A builder that keeps its records in `dir` (created if missing; what
    /// an earlier run left there is used again), spools objects in
    /// `spool_dir` and seals them to `recipients`.
    pub fn open(
        dir: PathBuf,
        spool_dir: PathBuf,
        recipients: Option<Recipients>,
    ) -> Result<Builder, BackupError> {
        let dir_error = |error| BackupError::local(format!("read {}", dir.display()), error);
        std::fs::create_dir_all(&dir).map_err(dir_error)?;
        let mut built: HashMap<Point, (Point, PathBuf)> = HashMap::new();
        for entry in std::fs::read_dir(&dir).map_err(dir_error)? {
            let path = entry.map_err(dir_error)?.path();
            let (start, end) = match record_range(&path) {
                Some(range) => range,
                None => {
                    // Not a whole record: an interrupted write, or damage.
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            match built.get(&start) {
                Some((kept, _)) if kept.0 >= end.0 => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {
                    if let Some((_, older)) = built.insert(start, (end, path)) {
                        let _ = std::fs::remove_file(older);
                    }
                }
            }
        }
        Ok(Builder {
            dir,
            spool_dir,
            recipients,
            built,
            failed: HashSet::new(),
        })
    }

    /// Whether building `needed` failed before.
    pub fn failed_before(&self, needed: &Needed) -> bool {
        self.failed.contains(&(needed.start, needed.end))
    }

    /// Builds `needed` for `database`, or says why it cannot (and remembers
    /// that).
    pub fn build(
        &mut self,
        database: &Database,
        needed: &Needed,
    ) -> Result<Result<Built, Unbuildable>, BackupError> {
        let result = self.assemble(database, needed);
        if let Ok(Err(_)) = result {
            self.failed.insert((needed.start, needed.end));
        }
        result
    }

    /// [`Builder::build`] without remembering failures.
    fn assemble(
        &mut self,
        database: &Database,
        needed: &Needed,
    ) -> Result<Result<Built, Unbuildable>, BackupError> {
        let spool_dir = self.spool_dir.as_path();
        let spool_error = |error| BackupError::local("spool a cumulative object", error);
        let mut kept = Vec::new();
        let mut kept_starts = Vec::new();
        let mut change_sets = Vec::new();
        let mut at = needed.start;
        while at != needed.end {
            if let Some((end, path)) = self.built.get(&at)
                && end.0 <= needed.end.0
            {
                kept.push(File::open(path).map_err(spool_error)?);
                kept_starts.push(at);
                at = *end;
                continue;
            }
            let Some(read) = read_log(database, at, needed.end)? else {
                return Ok(Err(Unbuildable::NotInLog));
            };
            change_sets = read;
            at = needed.end;
        }
        let mut first_header = [0u8; ltx::HEADER_SIZE];
        match (kept.first(), change_sets.first()) {
            (Some(file), _) => file
                .read_exact_at(&mut first_header, 0)
                .map_err(spool_error)?,
            (None, Some(change_set)) => {
                let available = change_set.len().min(ltx::HEADER_SIZE);
                first_header[..available].copy_from_slice(&change_set[..available]);
            }
            (None, None) => return Ok(Err(Unbuildable::NotInLog)),
        }
        let page_size = Header::decode(&first_header).map_or(4096, |header| header.page_size);
        let max_pages = (MAX_CUMULATIVE_PAGE_BYTES / u64::from(page_size.max(512))) as usize;
        let mut record = tempfile::NamedTempFile::new_in(&self.dir).map_err(spool_error)?;
        let plain = record.as_file_mut();
        let inputs = kept
            .into_iter()
            .map(|file| Box::new(BufReader::new(file)) as Box<dyn std::io::Read>)
            .chain(
                change_sets
                    .iter()
                    .map(|set| Box::new(&set[..]) as Box<dyn std::io::Read>),
            );
        let mut writer = BufWriter::new(&mut *plain);
        let header =
            match ltx::compact_within(inputs, true, max_pages, &mut writer).and_then(|header| {
                writer
                    .flush()
                    .map(|()| header)
                    .map_err(|error| LtxError::io("writing the compacted file", error))
            }) {
                Ok(header) => {
                    drop(writer);
                    header
                }
                Err(LtxError::TooManyPages { .. }) => return Ok(Err(Unbuildable::TooLarge)),
                Err(error @ LtxError::Io { .. }) => {
                    return Err(BackupError::local(
                        "write a cumulative record",
                        std::io::Error::other(error),
                    ));
                }
                Err(error) if !kept_starts.is_empty() => {
                    // A record kept in the data dir is damaged: forget the
                    // ones this build read, and start again from a snapshot.
                    tracing::warn!(
                        database = database.name(),
                        dir = %self.dir.display(),
                        %error,
                        "a kept cumulative record is damaged; dropping it"
                    );
                    for start in kept_starts {
                        if let Some((_, path)) = self.built.remove(&start) {
                            let _ = std::fs::remove_file(path);
                        }
                    }
                    return Ok(Err(Unbuildable::NotInLog));
                }
                Err(error) => {
                    return Err(BackupError::Store(crate::store::StoreError::Capture {
                        database: database.name().to_string(),
                        message: format!("a cumulative object does not compact: {error}"),
                    }));
                }
            };
        plain.sync_data().map_err(spool_error)?;
        let object = frame(plain, spool_dir, self.recipients.as_ref()).map_err(spool_error)?;
        let name = ObjectName {
            database: database.name().to_string(),
            kind: ObjectKind::Cumulative,
            level: needed.level,
            min_txid: TxId(needed.start.0.0 + 1),
            max_txid: needed.end.0,
            epoch: header.node_id,
            pre_apply: needed.start.1,
            post_apply: needed.end.1,
            timestamp_ms: header.timestamp,
            sha256: object.1,
        };
        let path = self.dir.join(format!(
            "{:016x}-{:016x}.ltx",
            needed.start.0.0 + 1,
            needed.end.0.0
        ));
        record
            .persist(&path)
            .map_err(|error| spool_error(error.error))?;
        if let Some((_, older)) = self.built.insert(needed.start, (needed.end, path.clone()))
            && older != path
        {
            let _ = std::fs::remove_file(older);
        }
        Ok(Ok(Built {
            name,
            file: object.0,
            size: object.2,
        }))
    }

    /// Forgets what starts at points not in `starts` (points no chain
    /// reaches any more).
    pub fn retain(&mut self, starts: &HashSet<Point>) {
        self.built.retain(|start, (_, path)| {
            let keep = starts.contains(start);
            if !keep {
                let _ = std::fs::remove_file(path);
            }
            keep
        });
        self.failed.retain(|(start, _)| starts.contains(start));
    }
}

/// The folder in the data dir `data_dir` where the builder of `database`'s
/// cumulative objects for the destination at `url` keeps its records.
pub fn state_dir(data_dir: &Path, url: &str, database: &str) -> PathBuf {
    let digest = sha2::Sha256::digest(url.as_bytes());
    data_dir
        .join(STATE_DIR)
        .join(crate::hex::encode(&digest[..8]))
        .join(database)
}

/// The folder of the data dir that holds the builders' records.
pub const STATE_DIR: &str = "backup-cumulative";

/// Where the record in the file at `path` starts and ends, from its header
/// and trailer; `None` when it is not a whole LTX file.
fn record_range(path: &Path) -> Option<(Point, Point)> {
    let file = File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let mut header = [0u8; ltx::HEADER_SIZE];
    let mut trailer = [0u8; ltx::TRAILER_SIZE];
    file.read_exact_at(&mut header, 0).ok()?;
    file.read_exact_at(&mut trailer, size.checked_sub(ltx::TRAILER_SIZE as u64)?)
        .ok()?;
    let header = Header::decode(&header).ok()?;
    let trailer = ltx::Trailer::decode(&trailer).ok()?;
    (header.min_txid.0 > 1).then_some((
        (TxId(header.min_txid.0 - 1), header.pre_apply_checksum),
        (header.max_txid, trailer.post_apply_checksum),
    ))
}

/// The change sets from `from` to `to` in `database`'s log, or `None` when
/// the log does not hold them one by one (retention merged past `from`, a
/// change set spans `to`) or they exceed [`MAX_CUMULATIVE_LOG_BYTES`].
fn read_log(
    database: &Database,
    from: Point,
    to: Point,
) -> Result<Option<Vec<Vec<u8>>>, BackupError> {
    let position = Position {
        txid: from.0,
        checksum: from.1,
    };
    let CatchUp::ChangeSets(change_sets) =
        database.catch_up(position, &[], MAX_CUMULATIVE_LOG_BYTES)?
    else {
        return Ok(None);
    };
    let mut kept = Vec::new();
    for change_set in change_sets {
        let Ok(header) = Header::decode(change_set.get(..ltx::HEADER_SIZE).unwrap_or(&[])) else {
            return Ok(None);
        };
        if header.max_txid > to.0 {
            return Ok(None);
        }
        let last = header.max_txid == to.0;
        kept.push(change_set);
        if last {
            return Ok(Some(kept));
        }
    }
    Ok(None)
}

/// Writes `plain` (one LTX file) as an object of one record, sealed into one
/// frame when there are `recipients`, to a new spool file: the file (rewound), its SHA-256 and size.
fn frame(
    plain: &mut File,
    spool_dir: &Path,
    recipients: Option<&Recipients>,
) -> std::io::Result<(File, [u8; 32], u64)> {
    let length = plain.stream_position()?;
    plain.rewind()?;
    let mut object = tempfile::tempfile_in(spool_dir)?;
    let prefix = length.to_be_bytes();
    let mut framed = (&prefix[..]).chain(BufReader::new(plain));
    match recipients {
        Some(recipients) => super::uploader::seal_frame(recipients, &mut framed, &mut object)?,
        None => {
            std::io::copy(&mut framed, &mut object)?;
        }
    }
    let (sha256, size) = super::uploader::digest_file(&mut object)?;
    Ok((object, sha256, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::compaction::{runs_to_merge, unusable_cumulatives};
    use crate::backup::layout::{Target, plan};
    use crate::config::DEFAULT_BACKUP_COMPACTION_WINDOWS;

    use crate::backup::layout::sample_object as object;

    /// A model of a destination under the uploader: one change object per
    /// second, compaction and cumulative objects after every window of the
    /// shortest level, a second snapshot part-way. Returns the longest plan
    /// of the newest state seen after any second, and the longest plan of any
    /// earlier TXID at the end.
    fn simulate(seconds: u64, with_cumulatives: bool) -> (usize, usize) {
        let windows = DEFAULT_BACKUP_COMPACTION_WINDOWS;
        let grace = Duration::from_secs(2);
        let start_ms = 1_800_000_000_000;
        let mut objects = vec![object(ObjectKind::Snapshot, 0, (1, 1), start_ms)];
        let mut next_run_ms = 0;
        let mut longest_latest = 0;
        for second in 1..=seconds {
            let now = start_ms + second * 1000;
            let txid = second + 1;
            objects.push(object(ObjectKind::Changes, 0, (txid, txid), now));
            if second == seconds / 2 + 7 {
                objects.push(object(ObjectKind::Snapshot, 0, (1, txid), now));
            }
            if now >= next_run_ms {
                for (index, window) in windows.iter().enumerate() {
                    let level = index as u8 + 1;
                    for run in runs_to_merge(&objects, level, *window, grace, now) {
                        let (first, last) = (&run[0], &run[run.len() - 1]);
                        let merged = object(
                            ObjectKind::Changes,
                            level,
                            (first.min_txid.0, last.max_txid.0),
                            last.timestamp_ms,
                        );
                        objects.retain(|object| !run.contains(object));
                        objects.push(merged);
                    }
                }
                let unusable = unusable_cumulatives(&objects);
                objects.retain(|object| !unusable.contains(object));
                if with_cumulatives {
                    for wanted in needed(&objects, &windows, grace, now) {
                        let end = objects
                            .iter()
                            .find(|object| object.end() == wanted.end)
                            .expect("a needed object ends where a link ends")
                            .timestamp_ms;
                        objects.push(object(
                            ObjectKind::Cumulative,
                            wanted.level,
                            (wanted.start.0.0 + 1, wanted.end.0.0),
                            end,
                        ));
                    }
                }
                next_run_ms = crate::backup::compaction::next_run_ms(now, &windows, grace);
            }
            let latest = plan("app.db", &objects, Target::Latest).unwrap();
            assert_eq!(latest.objects.last().unwrap().max_txid, TxId(txid));
            longest_latest = longest_latest.max(latest.objects.len());
        }
        let longest_earlier = (2..=seconds)
            .step_by(7)
            .map(|txid| {
                plan("app.db", &objects, Target::TxId(TxId(txid)))
                    .unwrap()
                    .objects
                    .len()
            })
            .max()
            .unwrap();
        (longest_latest, longest_earlier)
    }

    #[test]
    fn with_the_default_windows_any_restore_reads_at_most_sixteen_objects() {
        let seconds = 3 * 60 * 60 + 123;
        let (latest, earlier) = simulate(seconds, true);
        // The snapshot, one cumulative object per level, and the change
        // objects of the last window of 10 s not yet merged (up to 10, plus
        // the grace of two sync intervals).
        assert!(latest <= 16, "the newest state needed {latest} objects");
        // The snapshot, cumulative objects, and the change object that holds
        // the TXID.
        assert!(earlier <= 5, "an earlier TXID needed {earlier} objects");
        let (latest_without, _) = simulate(seconds, false);
        assert!(
            latest_without > 2 * latest,
            "{latest_without} against {latest}"
        );
    }
}
