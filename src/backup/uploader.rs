//! The primary's uploader: one task per destination that, every
//! `backup.sync-interval` while this node's store is the primary, ships each
//! database's change sets since the destination's position as one object, or
//! a snapshot when the destination has nothing this log can follow from or a
//! snapshot is due, then deletes what `backup.retention` no longer needs.
//!
//! Invariants: the store is only read on the blocking pool, never on an async
//! thread, so commits never wait for a destination; the destination's position
//! is learnt from a listing whenever this node (re)becomes the primary or its
//! lease epoch changes, so a new primary continues the same history; a failed
//! round changes nothing remote that a later round depends on (objects are
//! immutable and named by their content), and is retried with backoff; a
//! failure is logged when the destination's state changes, not every round.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::encryption::Recipients;
use super::layout::{
    self, ObjectKind, ObjectName, Point, RECORD_LENGTH_BYTES, Target, frame_record,
};
use super::{BackupError, Destination, compaction, cumulative};
use crate::config::BackupConfig;
use crate::ltx::{self, Checksum, Header, Trailer, TxId};
use crate::store::cluster::unix_now_ms;
use crate::store::{CatchUp, Database, Position, RetentionPins, Role, Store};
use crate::sync::LockUnpoisoned;

/// The most change-set bytes one object takes; a longer backlog goes out in
/// several objects, one per round.
pub const MAX_OBJECT_CHANGE_BYTES: u64 = 64 * 1024 * 1024;
/// The longest wait between two attempts at a failing destination.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(10);

/// What the uploaders report, per destination (by URL) and database, for
/// `ltxfs status` and `/metrics`.
#[derive(Debug, Default)]
pub struct BackupStatus {
    destinations: Mutex<BTreeMap<String, DestinationStatus>>,
}

/// One destination's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestinationStatus {
    /// Per database.
    pub databases: BTreeMap<String, DatabaseBackup>,
    /// Rounds that failed since start.
    pub errors: u64,
    /// Whether the last round failed.
    pub failing: bool,
    /// Whether this node has listed the destination since it became the
    /// primary (until then, what it holds is unknown).
    pub learnt: bool,
}

/// How far one database's backup at one destination is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatabaseBackup {
    /// The newest TXID stored there.
    pub txid: TxId,
    /// When this node first saw a commit the destination does not have yet
    /// (Unix ms); `None` while the destination has everything seen.
    pub behind_since_ms: Option<u64>,
}

impl DatabaseBackup {
    /// The backup lag at `now_ms`: how long the oldest commit not yet stored
    /// has waited (as seen once per sync interval); zero when caught up.
    pub fn lag(&self, now_ms: u64) -> Duration {
        Duration::from_millis(
            self.behind_since_ms
                .map_or(0, |since| now_ms.saturating_sub(since)),
        )
    }
}

impl BackupStatus {
    /// The status of `destinations`, none of them learnt yet.
    pub fn for_destinations(destinations: &[Destination]) -> BackupStatus {
        BackupStatus {
            destinations: Mutex::new(
                destinations
                    .iter()
                    .map(|destination| (destination.to_string(), DestinationStatus::default()))
                    .collect(),
            ),
        }
    }

    /// A copy of every destination's state, by URL.
    pub fn snapshot(&self) -> BTreeMap<String, DestinationStatus> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, DestinationStatus>> {
        self.destinations.lock_unpoisoned()
    }

    fn update(&self, destination: &Destination, change: impl FnOnce(&mut DestinationStatus)) {
        change(self.lock().entry(destination.to_string()).or_default());
    }

    fn update_database(
        &self,
        destination: &Destination,
        database: &str,
        change: impl FnOnce(&mut DatabaseBackup),
    ) {
        self.update(destination, |status| {
            change(status.databases.entry(database.to_string()).or_default())
        });
    }
}

impl RetentionPins for BackupStatus {
    /// The oldest TXID of `database` any destination stores: what follows it
    /// must stay in the log until every destination has it. A destination not
    /// listed yet (after a start, or while it fails) keeps everything; one
    /// that has nothing of the database needs a snapshot anyway.
    fn keep_after(&self, database: &str) -> Option<TxId> {
        self.lock()
            .values()
            .filter_map(|status| match status.databases.get(database) {
                _ if !status.learnt => Some(TxId(0)),
                Some(backup) => Some(backup.txid),
                None => None,
            })
            .min()
    }
}

/// The uploaders of every destination.
pub struct Uploader {
    /// The node's store.
    pub store: Arc<Store>,
    /// Where backups go.
    pub destinations: Vec<Destination>,
    /// `backup.*`.
    pub config: BackupConfig,
    /// Where snapshots are spooled before upload (the data dir).
    pub spool_dir: PathBuf,
    /// Shared with status and metrics.
    pub status: Arc<BackupStatus>,
    /// Whom objects are encrypted to (`backup.encryption.age-recipients`).
    pub recipients: Option<Recipients>,
}

impl Uploader {
    /// Starts one task per destination on the current runtime; they end when
    /// `shutdown` is cancelled.
    pub fn spawn(self, shutdown: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        self.destinations
            .iter()
            .map(|destination| {
                let round = DestinationLoop {
                    destination: destination.clone(),
                    store: self.store.clone(),
                    config: self.config.clone(),
                    spool_dir: self.spool_dir.clone(),
                    status: self.status.clone(),
                    recipients: self.recipients.clone(),
                    remote: None,
                    next_compaction_ms: 0,
                    cumulatives: HashMap::new(),
                };
                tokio::spawn(round.run(shutdown.clone()))
            })
            .collect()
    }
}

/// What this node knows a destination holds of one database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Remote {
    /// Where its newest chain ends.
    position: Position,
    /// When its newest snapshot was taken.
    last_snapshot_ms: u64,
}

/// The destination's state as learnt by this node while primary under
/// `epoch`.
struct Known {
    epoch: u64,
    databases: HashMap<String, Remote>,
}

struct DestinationLoop {
    /// Per database, what cumulative objects are built from.
    cumulatives: HashMap<String, cumulative::Builder>,
    destination: Destination,
    store: Arc<Store>,
    config: BackupConfig,
    spool_dir: PathBuf,
    status: Arc<BackupStatus>,
    recipients: Option<Recipients>,
    remote: Option<Known>,
    /// When compaction runs next (Unix ms); 0 runs it in the first round.
    next_compaction_ms: u64,
}

impl DestinationLoop {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut wait = self.config.sync_interval;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            if self.store.cluster().role() != Role::Primary {
                // Fenced: a node that is not the primary uploads nothing, shows
                // no backup figures, and learns the destination again when it
                // is the primary.
                self.remote = None;
                self.status.update(&self.destination, |status| {
                    *status = DestinationStatus::default();
                });
                wait = self.config.sync_interval;
                continue;
            }
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.round() => result,
            };
            match result {
                Ok(()) => {
                    let mut recovered = false;
                    self.status.update(&self.destination, |status| {
                        recovered = status.failing;
                        status.failing = false;
                    });
                    if recovered {
                        tracing::info!(destination = %self.destination, "backups reach the destination again");
                    }
                    wait = self.config.sync_interval;
                }
                Err(error) => {
                    let mut first = false;
                    self.status.update(&self.destination, |status| {
                        first = !status.failing;
                        status.failing = true;
                        status.errors += 1;
                    });
                    if first {
                        tracing::warn!(destination = %self.destination, %error, "backup failed; retrying with backoff (commits go on)");
                    } else {
                        tracing::debug!(destination = %self.destination, %error, "backup failed again");
                    }
                    // The destination may have changed meanwhile (a partly
                    // finished round): learn it again.
                    self.remote = None;
                    wait = (wait * 2).clamp(self.config.sync_interval, MAX_RETRY_BACKOFF);
                }
            }
        }
    }

    /// One round: every database that moved is uploaded, then a snapshot of
    /// each one whose snapshot is due, then compaction once a window passed.
    async fn round(&mut self) -> Result<(), BackupError> {
        let epoch = self.store.epoch();
        if self
            .remote
            .as_ref()
            .is_none_or(|known| known.epoch != epoch)
        {
            let databases = learn(&self.destination).await?;
            for (name, remote) in &databases {
                self.status
                    .update_database(&self.destination, name, |backup| {
                        backup.txid = remote.position.txid;
                    });
            }
            self.status
                .update(&self.destination, |status| status.learnt = true);
            self.remote = Some(Known { epoch, databases });
        }
        for (name, position) in self.store.positions() {
            if position.txid.0 == 0 {
                continue;
            }
            let Some(database) = self.store.database(&name) else {
                continue;
            };
            let remote = self.known(&name);
            if remote.is_none_or(|remote| remote.position != position) {
                let now = unix_now_ms();
                self.status
                    .update_database(&self.destination, &name, |backup| {
                        backup.behind_since_ms.get_or_insert(now);
                    });
                let from = remote.map(|remote| remote.position);
                self.ship(&name, &database, from, position).await?;
            }
            let snapshot_due = self.known(&name).is_some_and(|remote| {
                unix_now_ms().saturating_sub(remote.last_snapshot_ms)
                    >= self.config.snapshot_interval.as_millis() as u64
            });
            if snapshot_due {
                self.ship(&name, &database, None, position).await?;
            }
        }
        let now = unix_now_ms();
        if now >= self.next_compaction_ms {
            let names: Vec<String> = self
                .remote
                .as_ref()
                .map(|known| known.databases.keys().cloned().collect())
                .unwrap_or_default();
            for name in names {
                let objects = compaction::compact(
                    &self.destination,
                    &name,
                    &self.config.compaction_windows,
                    self.config.sync_interval * 2,
                    &self.spool_dir,
                )
                .await?;
                self.extend_cumulatives(&name, &objects).await?;
            }
            self.next_compaction_ms = compaction::next_run_ms(
                now,
                &self.config.compaction_windows,
                self.config.sync_interval * 2,
            );
        }
        Ok(())
    }

    /// Builds and uploads the cumulative objects that the newest chain of
    /// `database` (whose objects are `objects`) lacks. When this node cannot
    /// build one, the next round uploads a snapshot, from which new ones
    /// start.
    async fn extend_cumulatives(
        &mut self,
        name: &str,
        objects: &[ObjectName],
    ) -> Result<(), BackupError> {
        let Some(database) = self.store.database(name) else {
            return Ok(());
        };
        let needed = cumulative::needed(
            objects,
            &self.config.compaction_windows,
            self.config.sync_interval * 2,
            unix_now_ms(),
        );
        let builder = self.cumulatives.remove(name);
        let starts: HashSet<Point> = layout::chains(objects)
            .iter()
            .flatten()
            .map(|link| link.end())
            .collect();
        let state_dir = cumulative::state_dir(&self.spool_dir, &self.destination.to_string(), name);
        let (spool_dir, recipients) = (self.spool_dir.clone(), self.recipients.clone());
        // Reading and writing the kept records is file I/O: on the blocking
        // pool, like the builds.
        let (builder, built, unbuildable) = tokio::task::spawn_blocking(move || {
            let mut builder = match builder {
                Some(builder) => builder,
                None => match cumulative::Builder::open(state_dir, spool_dir, recipients) {
                    Ok(builder) => builder,
                    Err(error) => return (None, Err(error), None),
                },
            };
            builder.retain(&starts);
            let mut built = Vec::new();
            for wanted in &needed {
                if builder.failed_before(wanted) {
                    continue;
                }
                match builder.build(&database, wanted) {
                    Ok(Ok(object)) => built.push(object),
                    Ok(Err(why)) => {
                        return (Some(builder), Ok(built), Some((wanted.clone(), why)));
                    }
                    Err(error) => return (Some(builder), Err(error), None),
                }
            }
            (Some(builder), Ok(built), None)
        })
        .await
        .map_err(|error| {
            BackupError::local("build cumulative objects", std::io::Error::other(error))
        })?;
        if let Some(builder) = builder {
            self.cumulatives.insert(name.to_string(), builder);
        }
        for object in built? {
            self.destination
                .put_spooled(&object.name, object.file, object.size)
                .await?;
            tracing::debug!(object = %object.name, "uploaded a cumulative object");
        }
        let Some((wanted, why)) = unbuildable else {
            return Ok(());
        };
        // A snapshot restarts the cumulative objects from a point this node
        // holds; at most one per window of the highest level, so a database
        // that changes too much for them is not snapshotted every round.
        let top_window_ms = self
            .config
            .compaction_windows
            .last()
            .map_or(0, |window| window.as_millis() as u64);
        let Some(remote) = self
            .remote
            .as_mut()
            .and_then(|known| known.databases.get_mut(name))
        else {
            return Ok(());
        };
        if unix_now_ms().saturating_sub(remote.last_snapshot_ms) >= top_window_ms {
            tracing::info!(
                destination = %self.destination,
                database = name,
                from_txid = %wanted.start.0,
                to_txid = %wanted.end.0,
                reason = ?why,
                "uploading a snapshot: this node cannot build a cumulative object"
            );
            remote.last_snapshot_ms = 0;
        }
        Ok(())
    }

    /// What this node knows the destination holds of `database`.
    fn known(&self, database: &str) -> Option<Remote> {
        self.remote
            .as_ref()
            .and_then(|known| known.databases.get(database).copied())
    }

    /// Uploads what follows `from` in `database` (a snapshot when `from` is
    /// `None` or the log cannot follow from it) and records where the
    /// destination now stands; `position` is the database's position when
    /// the round began.
    async fn ship(
        &mut self,
        name: &str,
        database: &Arc<Database>,
        from: Option<Position>,
        position: Position,
    ) -> Result<(), BackupError> {
        let spool_dir = self.spool_dir.clone();
        let database = database.clone();
        let recipients = self.recipients.clone();
        let batch = tokio::task::spawn_blocking(move || {
            read_batch(&database, from, &spool_dir, recipients.as_ref())
        })
        .await
        .map_err(|error| BackupError::local("read change sets", std::io::Error::other(error)))??;
        let uploaded = self.upload(batch).await?;
        let mut remote = self.known(name).unwrap_or(Remote {
            position: Position::UNKNOWN,
            last_snapshot_ms: 0,
        });
        remote.position = Position {
            txid: uploaded.max_txid,
            checksum: uploaded.post_apply,
        };
        if uploaded.kind == ObjectKind::Snapshot {
            remote.last_snapshot_ms = uploaded.timestamp_ms;
        }
        self.status
            .update_database(&self.destination, name, |backup| {
                backup.txid = uploaded.max_txid;
                if uploaded.max_txid >= position.txid {
                    backup.behind_since_ms = None;
                }
            });
        self.remote
            .as_mut()
            .expect("learnt at the start of the round")
            .databases
            .insert(name.to_string(), remote);
        if uploaded.kind == ObjectKind::Snapshot {
            self.enforce_retention(name).await?;
        }
        Ok(())
    }

    async fn upload(&self, batch: Batch) -> Result<ObjectName, BackupError> {
        match batch {
            Batch::Changes(name, bytes) => {
                self.destination.put_new(&name, bytes).await?;
                tracing::debug!(object = %name, "uploaded change sets");
                Ok(name)
            }
            Batch::Snapshot(name, file, size) => {
                self.destination.put_spooled(&name, file, size).await?;
                tracing::info!(destination = %self.destination, object = %name, bytes = size, "uploaded a snapshot");
                Ok(name)
            }
        }
    }

    /// Deletes the objects of `database` that no restore within
    /// `backup.retention` needs: everything before the newest snapshot taken
    /// before the window.
    async fn enforce_retention(&self, database: &str) -> Result<(), BackupError> {
        let objects = self.destination.list(Some(database)).await?;
        let cutoff = unix_now_ms().saturating_sub(self.config.retention.as_millis() as u64);
        let Some(base) = objects
            .iter()
            .map(|listed| &listed.name)
            .filter(|name| name.kind == ObjectKind::Snapshot && name.timestamp_ms <= cutoff)
            .max_by_key(|name| (name.max_txid, name.epoch))
        else {
            return Ok(());
        };
        let mut deleted = 0usize;
        for listed in &objects {
            let name = &listed.name;
            if name != base
                && name.max_txid <= base.max_txid
                && name.timestamp_ms <= base.timestamp_ms
            {
                self.destination.delete(name).await?;
                deleted += 1;
            }
        }
        if deleted > 0 {
            tracing::info!(destination = %self.destination, database, deleted, "deleted backup objects older than backup.retention");
        }
        Ok(())
    }
}

/// Where every database's newest chain ends at `destination`, and when its
/// newest snapshot was taken.
async fn learn(destination: &Destination) -> Result<HashMap<String, Remote>, BackupError> {
    let listed = destination.list(None).await?;
    let mut by_database: BTreeMap<String, Vec<ObjectName>> = BTreeMap::new();
    for object in listed {
        by_database
            .entry(object.name.database.clone())
            .or_default()
            .push(object.name);
    }
    let mut databases = HashMap::new();
    for (name, objects) in by_database {
        let last_snapshot_ms = objects
            .iter()
            .filter(|object| object.kind == ObjectKind::Snapshot)
            .map(|object| object.timestamp_ms)
            .max();
        let plan = match layout::plan(&name, &objects, Target::Latest) {
            Ok(plan) => plan,
            Err(error) => {
                // A gap or no snapshot: a new snapshot starts a chain the
                // newest state restores from.
                tracing::warn!(destination = %destination, %error, "uploading a new snapshot");
                continue;
            }
        };
        let Some(last_snapshot_ms) = last_snapshot_ms else {
            continue;
        };
        let end = plan.objects.last().expect("a plan has its snapshot");
        databases.insert(
            name,
            Remote {
                position: Position {
                    txid: end.max_txid,
                    checksum: end.post_apply,
                },
                last_snapshot_ms,
            },
        );
    }
    Ok(databases)
}

/// One object ready to upload.
enum Batch {
    /// Change sets, framed, in memory.
    Changes(ObjectName, Bytes),
    /// A snapshot in a spool file (rewound), with its size.
    Snapshot(ObjectName, File, u64),
}

/// Reads what follows `from` in `database`'s log (at most
/// [`MAX_OBJECT_CHANGE_BYTES`]), or a snapshot when there is no `from` or the
/// log cannot follow from it. Blocking.
fn read_batch(
    database: &Database,
    from: Option<Position>,
    spool_dir: &std::path::Path,
    recipients: Option<&Recipients>,
) -> Result<Batch, BackupError> {
    if let Some(from) = from {
        match database.catch_up(from, &[], MAX_OBJECT_CHANGE_BYTES)? {
            CatchUp::ChangeSets(change_sets) if !change_sets.is_empty() => {
                return changes_object(database.name(), &change_sets, recipients);
            }
            CatchUp::ChangeSets(_) => {}
            CatchUp::Snapshot { reason, .. } => {
                tracing::info!(database = database.name(), reason, "uploading a snapshot");
            }
        }
    }
    snapshot_object(database, spool_dir, recipients)
}

/// Frames `change_sets` (consecutive, as logged) into one object, sealed to
/// `recipients` when given.
fn changes_object(
    database: &str,
    change_sets: &[Vec<u8>],
    recipients: Option<&Recipients>,
) -> Result<Batch, BackupError> {
    let header = |bytes: &[u8]| Header::decode(bytes.get(..ltx::HEADER_SIZE).unwrap_or(bytes));
    let trailer =
        |bytes: &[u8]| Trailer::decode(&bytes[bytes.len().saturating_sub(ltx::TRAILER_SIZE)..]);
    let logged = |error: ltx::LtxError| {
        BackupError::Store(crate::store::StoreError::Capture {
            database: database.to_string(),
            message: format!("a logged change set does not decode: {error}"),
        })
    };
    let first = header(&change_sets[0]).map_err(logged)?;
    let last_bytes = change_sets.last().expect("not empty");
    let last = header(last_bytes).map_err(logged)?;
    let post = trailer(last_bytes).map_err(logged)?.post_apply_checksum;
    let mut epoch = 0;
    let mut bytes = Vec::with_capacity(
        change_sets
            .iter()
            .map(|set| set.len() + RECORD_LENGTH_BYTES)
            .sum(),
    );
    for change_set in change_sets {
        epoch = epoch.max(header(change_set).map_err(logged)?.node_id);
        frame_record(&mut bytes, change_set);
    }
    let name = ObjectName {
        database: database.to_string(),
        kind: if first.is_snapshot() {
            ObjectKind::Snapshot
        } else {
            ObjectKind::Changes
        },
        level: 0,
        min_txid: first.min_txid,
        max_txid: last.max_txid,
        epoch,
        pre_apply: first.pre_apply_checksum,
        post_apply: post,
        timestamp_ms: last.timestamp,
        sha256: [0; 32],
    };
    let bytes = match recipients {
        Some(recipients) => {
            let mut sealed = std::io::Cursor::new(Vec::with_capacity(bytes.len() + 1024));
            seal_frame(recipients, &mut &bytes[..], &mut sealed)
                .map_err(|error| BackupError::local("encrypt change sets", error))?;
            sealed.into_inner()
        }
        None => bytes,
    };
    let name = ObjectName {
        sha256: Sha256::digest(&bytes).into(),
        ..name
    };
    Ok(Batch::Changes(name, Bytes::from(bytes)))
}

/// Writes a snapshot of `database` to a spool file in `spool_dir`, framed as
/// one record (sealed to `recipients` when given), and names it.
fn snapshot_object(
    database: &Database,
    spool_dir: &std::path::Path,
    recipients: Option<&Recipients>,
) -> Result<Batch, BackupError> {
    let spool_error = |error| BackupError::local("spool a snapshot", error);
    let mut file = tempfile::tempfile_in(spool_dir).map_err(spool_error)?;
    file.write_all(&[0u8; RECORD_LENGTH_BYTES])
        .map_err(spool_error)?;
    let mut writer = BufWriter::new(file);
    let position = database.write_snapshot(&mut writer)?;
    let mut file = writer
        .into_inner()
        .map_err(|error| spool_error(error.into_error()))?;
    let size = file.stream_position().map_err(spool_error)?;
    file.write_all_at(&(size - RECORD_LENGTH_BYTES as u64).to_be_bytes(), 0)
        .map_err(spool_error)?;
    let mut header_bytes = [0u8; ltx::HEADER_SIZE];
    file.read_exact_at(&mut header_bytes, RECORD_LENGTH_BYTES as u64)
        .map_err(spool_error)?;
    let header = Header::decode(&header_bytes).map_err(|error| {
        BackupError::Store(crate::store::StoreError::Capture {
            database: database.name().to_string(),
            message: format!("a snapshot does not decode: {error}"),
        })
    })?;
    if let Some(recipients) = recipients {
        file.rewind().map_err(spool_error)?;
        let mut sealed = tempfile::tempfile_in(spool_dir).map_err(spool_error)?;
        seal_frame(recipients, &mut BufReader::new(file), &mut sealed).map_err(spool_error)?;
        file = sealed;
    }
    let (sha256, size) = digest_file(&mut file).map_err(spool_error)?;
    let name = ObjectName {
        database: database.name().to_string(),
        kind: ObjectKind::Snapshot,
        level: 0,
        min_txid: TxId(1),
        max_txid: position.txid,
        epoch: header.node_id,
        pre_apply: Checksum(0),
        post_apply: position.checksum,
        timestamp_ms: header.timestamp,
        sha256,
    };
    Ok(Batch::Snapshot(name, file, size))
}

/// Writes what `plain` yields, sealed to `recipients`, to `out` as one frame.
pub(super) fn seal_frame<W: Write + Seek>(
    recipients: &Recipients,
    plain: &mut dyn Read,
    out: &mut W,
) -> std::io::Result<()> {
    let start = out.stream_position()?;
    out.write_all(&[0u8; RECORD_LENGTH_BYTES])?;
    {
        let mut writer = BufWriter::new(&mut *out);
        recipients.seal(plain, &mut writer)?;
        writer.flush()?;
    }
    let end = out.stream_position()?;
    out.seek(SeekFrom::Start(start))?;
    out.write_all(&(end - start - RECORD_LENGTH_BYTES as u64).to_be_bytes())?;
    out.seek(SeekFrom::Start(end))?;
    Ok(())
}

/// The SHA-256 and size of `file`, which is left rewound.
pub(super) fn digest_file(file: &mut File) -> std::io::Result<([u8; 32], u64)> {
    file.rewind()?;
    let mut digest = Sha256::new();
    let size = std::io::copy(file, &mut digest)?;
    file.rewind()?;
    Ok((digest.finalize().into(), size))
}
