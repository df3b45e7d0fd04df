//! The replica's spool file for a change set too large to hold in memory while
//! it arrives (a snapshot of a large database).
//!
//! The [`Reassembler`](super::chunk::Reassembler) hands out the bytes past its
//! memory bound; [`IncomingSpool`] appends them, on the blocking pool, to an
//! unnamed file the store makes beside its databases, and puts the change set
//! back together when its last chunk arrives.
//!
//! Invariants: the spool holds the bytes of at most one change set, the one
//! being reassembled; a change set comes out whole only when the spool holds
//! exactly the bytes the reassembler handed out; [`IncomingSpool::clear`]
//! forgets an incomplete one, and the file disappears once dropped.

use std::io::Write;
use std::sync::Arc;

use super::chunk::ChangeSet;
use super::wire::DatabaseName;
use super::{ReplicationError, blocking};
use crate::ltx::TxId;
use crate::store::{ChangeSetBytes, ChangeSetSpool, Store};

/// A whole change set as it arrived, not yet verified.
#[derive(Debug)]
pub(super) struct ArrivedChangeSet {
    /// The database its chunks are labelled with.
    pub(super) database: DatabaseName,
    /// Its LTX bytes.
    pub(super) bytes: ChangeSetBytes,
    /// The CRC its last chunk carried.
    pub(super) crc64: u64,
    /// The CRC of what arrived.
    pub(super) computed_crc64: u64,
    /// For a snapshot sent because the histories diverged, the newest TXID this
    /// replica's history shares with the primary's, as its last chunk said.
    pub(super) shared_txid: Option<TxId>,
}

/// The spool file of the change set being reassembled, if it needed one.
#[derive(Debug)]
pub(super) struct IncomingSpool {
    store: Arc<Store>,
    /// The file and how many bytes of the change set it holds.
    file: Option<(ChangeSetSpool, u64)>,
}

impl IncomingSpool {
    pub(super) fn new(store: Arc<Store>) -> IncomingSpool {
        IncomingSpool { store, file: None }
    }

    /// Appends the next bytes of the change set being reassembled, creating the
    /// file for the first.
    pub(super) async fn append(&mut self, bytes: Vec<u8>) -> Result<(), ReplicationError> {
        let store = self.store.clone();
        let spooled = self.file.take();
        self.file = Some(
            blocking(move || {
                let (mut spool, len) = match spooled {
                    Some(spooled) => spooled,
                    None => (store.change_set_spool()?, 0),
                };
                write_to(&mut spool, &bytes)?;
                Ok((spool, len + bytes.len() as u64))
            })
            .await?,
        );
        Ok(())
    }

    /// The whole of `change_set`, its last bytes appended to the spool file when
    /// earlier ones went there; the spool is empty again afterwards.
    pub(super) async fn complete(
        &mut self,
        change_set: ChangeSet,
    ) -> Result<ArrivedChangeSet, ReplicationError> {
        let ChangeSet {
            database,
            ltx: tail,
            spilled,
            crc64,
            computed_crc64,
            shared_txid,
        } = change_set;
        let spooled = self.file.take();
        let spooled_len = spooled.as_ref().map_or(0, |(_, len)| *len);
        if spooled_len != spilled {
            return Err(ReplicationError::Io {
                context: format!(
                    "reassemble a change set of {}: its spool file holds {spooled_len} bytes, not {spilled}",
                    database.as_str()
                ),
                source: std::io::ErrorKind::InvalidData.into(),
            });
        }
        let bytes = match spooled {
            None => ChangeSetBytes::InMemory(tail),
            Some((mut spool, len)) => {
                blocking(move || {
                    write_to(&mut spool, &tail)?;
                    Ok(ChangeSetBytes::InFile {
                        file: spool.file,
                        offset: spool.start,
                        len: len + tail.len() as u64,
                    })
                })
                .await?
            }
        };
        Ok(ArrivedChangeSet {
            database,
            bytes,
            crc64,
            computed_crc64,
            shared_txid,
        })
    }

    /// Forgets an incomplete change set: its stream broke off.
    pub(super) fn clear(&mut self) {
        self.file = None;
    }
}

/// Appends `bytes` to the spool file, at most
/// [`WRITE_PIECE_BYTES`](crate::store::WRITE_PIECE_BYTES) per system call.
fn write_to(spool: &mut ChangeSetSpool, bytes: &[u8]) -> Result<(), ReplicationError> {
    for piece in bytes.chunks(crate::store::WRITE_PIECE_BYTES) {
        spool
            .file
            .write_all(piece)
            .map_err(|source| ReplicationError::Io {
                context: "write an incoming change set to its spool file".to_string(),
                source,
            })?;
    }
    Ok(())
}
