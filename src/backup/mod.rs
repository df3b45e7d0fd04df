//! Continuous backups to object storage (S3 and S3-compatible services, GCS,
//! Azure, a local directory) and restores from them.
//!
//! The primary's [`uploader`] ships every change set of its log to each
//! destination once per `backup.sync-interval`, a snapshot when the
//! destination has nothing it can follow from or a snapshot is due, and
//! deletes what `backup.retention` no longer needs. [`restore`] rebuilds a
//! database at any TXID or time in the window, with no node running;
//! [`inspect`] lists and verifies what a destination holds. The remote layout
//! is in [`layout`]; `docs/backup.md` explains it to users.
//!
//! Invariants: commits never wait for object storage (the uploader reads the
//! store on the blocking pool and uploads from memory or a spool file); only
//! a node whose store is the primary uploads; every object name carries the
//! writer's lease epoch and the object's SHA-256 (which `verify` checks), and
//! restores check the LTX checksum chain of every record they apply, so a
//! wrong database is never written.
//!
//! Depends on: `store` (positions, change sets, snapshots), `ltx`, `config`,
//! `object_store`.

pub mod compaction;
pub mod cumulative;
pub mod destination;
pub mod encryption;
pub mod inspect;
pub mod layout;
pub mod restore;
pub mod uploader;

pub use destination::Destination;
pub use layout::{ObjectName, Target};
pub use restore::{RestoreProgress, Restored, restore};
pub use uploader::{BackupStatus, Uploader};

use crate::ltx::LtxError;
use crate::store::StoreError;

/// What can go wrong with a backup or a restore.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The destination's URL or settings cannot work (reported at start,
    /// exit status 2).
    #[error("backup destination {url}: {reason}")]
    InvalidDestination {
        /// The URL as configured.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A request to the destination failed.
    #[error("backup destination {destination}: could not {operation}: {message}")]
    Remote {
        /// The destination's URL.
        destination: String,
        /// What was being done (`put`, `list`, ...).
        operation: &'static str,
        /// Whether the object or bucket was not there.
        not_found: bool,
        /// The client's message, without credentials.
        message: String,
    },
    /// A local file could not be read or written.
    #[error("could not {context}: {source}")]
    Local {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store could not hand over change sets or a snapshot.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An object is damaged or does not follow the one before it.
    #[error("backup object {object} is bad: {reason}")]
    BadObject {
        /// The object's path under the destination.
        object: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An object is encrypted and no age identity was given.
    #[error(
        "backup object {object} is encrypted: pass --age-identity FILE (or set backup.encryption.age-identity-file)"
    )]
    Sealed {
        /// The object's path under the destination.
        object: String,
    },
    /// No restore reaches what was asked for.
    #[error(transparent)]
    Plan(#[from] layout::PlanError),
    /// The destination has no backup of this database.
    #[error("the destination has no backup of database `{0}`")]
    NoBackup(String),
}

impl BackupError {
    fn bad_object(object: &ObjectName, reason: impl Into<String>) -> BackupError {
        BackupError::BadObject {
            object: object.path(),
            reason: reason.into(),
        }
    }

    fn bad_ltx(object: &ObjectName, error: LtxError) -> BackupError {
        BackupError::bad_object(object, error.to_string())
    }

    /// Whether the destination answered that an object is not there.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            BackupError::Remote {
                not_found: true,
                ..
            }
        )
    }

    fn local(context: impl Into<String>, source: std::io::Error) -> BackupError {
        BackupError::Local {
            context: context.into(),
            source,
        }
    }
}
