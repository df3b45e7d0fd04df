//! What a destination holds (`ltxfs backup list`) and whether it is sound
//! (`ltxfs backup verify`).
//!
//! Verification reads every object: its SHA-256 against its name, every
//! record's LTX checksums, the chain of records inside it (each one's
//! pre-apply checksum is the previous one's post-apply checksum) and the
//! fields of its name; then restores each database's newest state into a
//! scratch file, which checks every page against the recorded checksums.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::encryption::Identities;
use super::layout::{self, ObjectKind, ObjectName};
use super::restore::{Opening, Records, download};
use super::{BackupError, Destination, Target};
use crate::ltx::{Checksum, Decoder, TxId};

/// One database's restorable range at one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DatabaseSummary {
    /// The database's name.
    pub database: String,
    /// The destination's URL.
    pub destination: String,
    /// The earliest restorable TXID and its commit time (ms), if any chain exists.
    pub earliest_txid: Option<u64>,
    /// Commit time (Unix ms) of the earliest restorable state.
    pub earliest_time_ms: Option<u64>,
    /// The latest restorable TXID.
    pub latest_txid: Option<u64>,
    /// Commit time (Unix ms) of the latest restorable state.
    pub latest_time_ms: Option<u64>,
    /// Objects held.
    pub objects: usize,
    /// Bytes held.
    pub bytes: u64,
}

/// Summarises what `destination` holds, per database (or only `database`).
pub async fn list(
    destination: &Destination,
    database: Option<&str>,
) -> Result<Vec<DatabaseSummary>, BackupError> {
    let listed = destination.list(database).await?;
    let mut by_database: BTreeMap<String, (Vec<ObjectName>, u64)> = BTreeMap::new();
    for object in listed {
        let entry = by_database.entry(object.name.database.clone()).or_default();
        entry.0.push(object.name);
        entry.1 += object.size;
    }
    Ok(by_database
        .into_iter()
        .map(|(name, (objects, bytes))| {
            let chains = layout::chains(&objects);
            let earliest = chains
                .iter()
                .map(|chain| chain[0])
                .min_by_key(|o| o.max_txid);
            let latest = chains.last().and_then(|chain| chain.last().copied());
            DatabaseSummary {
                database: name,
                destination: destination.to_string(),
                earliest_txid: earliest.map(|o| o.max_txid.0),
                earliest_time_ms: earliest.map(|o| o.timestamp_ms),
                latest_txid: latest.map(|o| o.max_txid.0),
                latest_time_ms: latest.map(|o| o.timestamp_ms),
                objects: objects.len(),
                bytes,
            }
        })
        .collect())
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Objects read and found sound.
    pub objects: usize,
    /// Databases whose objects are encrypted and were checked by digest only
    /// (no identity was given).
    pub sealed_databases: usize,
    /// Databases whose newest state was restored and checked.
    pub databases: usize,
}

/// Verifies every object of `destination` (or of `database`), stopping at the
/// first bad one. `scratch` is a directory for temporary files.
pub async fn verify(
    destination: &Destination,
    database: Option<&str>,
    scratch: &Path,
    identities: Option<&Identities>,
) -> Result<Verified, BackupError> {
    let opening = Opening {
        identities: identities.cloned(),
        spool_dir: scratch.to_path_buf(),
    };
    let listed = destination.list(database).await?;
    if let Some(wanted) = database
        && listed.is_empty()
    {
        return Err(BackupError::NoBackup(wanted.to_string()));
    }
    let mut databases: BTreeMap<String, Vec<ObjectName>> = BTreeMap::new();
    let mut checked = 0;
    let mut sealed = std::collections::BTreeSet::new();
    for object in &listed {
        let file = match download(destination, &object.name, scratch).await {
            // Merged or expired by the primary since the listing: what
            // replaced it is checked by the restore below.
            Err(error) if error.is_not_found() => continue,
            result => result?,
        };
        checked += 1;
        let name = object.name.clone();
        let opening = opening.clone();
        let checked_records =
            tokio::task::spawn_blocking(move || check_object(&name, file, &opening))
                .await
                .map_err(|error| {
                    BackupError::local("verify an object", std::io::Error::other(error))
                })?;
        match checked_records {
            Ok(()) => {}
            // Without the key only the digest is checked.
            Err(BackupError::Sealed { .. }) => {
                sealed.insert(object.name.database.clone());
            }
            Err(error) => return Err(error),
        }
        databases
            .entry(object.name.database.clone())
            .or_default()
            .push(object.name.clone());
    }
    for name in databases.keys().filter(|name| !sealed.contains(*name)) {
        let output = scratch.join(format!(".ltxfs-verify-{name}"));
        let result = super::restore(
            destination,
            name,
            Target::Latest,
            &output,
            identities,
            &mut |_| {},
        )
        .await;
        let _ = std::fs::remove_file(&output);
        result?;
    }
    Ok(Verified {
        objects: checked,
        sealed_databases: sealed.len(),
        databases: databases.len() - sealed.len(),
    })
}

/// Checks one downloaded object's records against each other and its name.
fn check_object(
    name: &ObjectName,
    file: std::fs::File,
    opening: &Opening,
) -> Result<(), BackupError> {
    let mut records = Records::new(file, opening);
    let mut previous: Option<(TxId, Checksum)> = None;
    let mut first_pre = None;
    let mut epoch = 0;
    let mut timestamp = 0;
    while let Some(record) = records.next_record(name)? {
        let mut decoder =
            Decoder::new(record).map_err(|error| BackupError::bad_ltx(name, error))?;
        let header = *decoder.header();
        let trailer = decoder
            .finish()
            .map_err(|error| BackupError::bad_ltx(name, error))?;
        if let Some((txid, checksum)) = previous
            && !header.is_snapshot()
            && (header.min_txid.0 != txid.0 + 1 || header.pre_apply_checksum != checksum)
        {
            return Err(BackupError::bad_object(
                name,
                format!(
                    "record {} does not follow the one before it",
                    header.filename()
                ),
            ));
        }
        first_pre.get_or_insert(header.pre_apply_checksum);
        epoch = epoch.max(header.node_id);
        timestamp = header.timestamp;
        previous = Some((header.max_txid, trailer.post_apply_checksum));
    }
    let Some((max_txid, post)) = previous else {
        return Err(BackupError::bad_object(name, "it holds no record"));
    };
    let matches = max_txid == name.max_txid
        && post == name.post_apply
        && first_pre == Some(name.pre_apply)
        && epoch == name.epoch
        && timestamp == name.timestamp_ms
        && (name.kind == ObjectKind::Snapshot) == name.pre_apply.0.eq(&0);
    if !matches {
        return Err(BackupError::bad_object(
            name,
            "its records do not match what its name says (TXIDs, checksums, epoch or time)",
        ));
    }
    Ok(())
}
