//! Splitting a change set into `LtxChunk` messages and putting it back together.
//!
//! Invariants: every piece is at most [`CHUNK_SIZE`] bytes and only the last has
//! `last` set; a change set of at most one chunk is moved, not copied. The
//! [`Reassembler`] accepts chunks of one database until one carries the change
//! set's CRC (the last), never holds more than its limit (refusing the chunk that
//! would pass it), refuses a chunk of another database while a change set is
//! incomplete, and refuses an empty change set. It does not check the CRC: the
//! replica does that on the blocking pool, right before applying.

use crate::ltx::TxId;

use super::wire::{Chunk, DatabaseName};
use super::{CHUNK_SIZE, ReplicationError};

/// The pieces of one change set, in order.
pub(super) struct Pieces {
    data: Vec<u8>,
    offset: usize,
    done: bool,
}

impl Pieces {
    /// Splits `data` (one whole change set) into pieces of [`CHUNK_SIZE`].
    pub(super) fn new(data: Vec<u8>) -> Pieces {
        Pieces {
            data,
            offset: 0,
            done: false,
        }
    }
}

impl Iterator for Pieces {
    /// A piece and whether it is the last.
    type Item = (Vec<u8>, bool);

    fn next(&mut self) -> Option<(Vec<u8>, bool)> {
        if self.done {
            return None;
        }
        if self.offset == 0 && self.data.len() <= CHUNK_SIZE {
            self.done = true;
            return Some((std::mem::take(&mut self.data), true));
        }
        let end = (self.offset + CHUNK_SIZE).min(self.data.len());
        let piece = self.data[self.offset..end].to_vec();
        self.offset = end;
        self.done = end == self.data.len();
        Some((piece, self.done))
    }
}

/// A whole change set as it arrived, not yet verified.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ChangeSet {
    /// The database its chunks are labelled with.
    pub(super) database: DatabaseName,
    /// Its LTX bytes.
    pub(super) ltx: Vec<u8>,
    /// The CRC its last chunk carried.
    pub(super) crc64: u64,
    /// For a snapshot sent because the histories diverged, the newest TXID this
    /// replica's history shares with the primary's, as its last chunk said.
    pub(super) shared_txid: Option<TxId>,
}

/// Collects the chunks of one change set at a time.
#[derive(Debug)]
pub(super) struct Reassembler {
    limit: u64,
    pending: Option<(DatabaseName, Vec<u8>)>,
}

impl Reassembler {
    /// A reassembler that refuses change sets larger than `limit` bytes.
    pub(super) fn new(limit: u64) -> Reassembler {
        Reassembler {
            limit,
            pending: None,
        }
    }

    /// The database whose change set is incomplete and how many of its bytes
    /// have arrived, if any.
    pub(super) fn pending(&self) -> Option<(&DatabaseName, u64)> {
        self.pending
            .as_ref()
            .map(|(database, data)| (database, data.len() as u64))
    }

    /// Forgets an incomplete change set (the stream it came on is gone).
    pub(super) fn clear(&mut self) {
        self.pending = None;
    }

    /// Adds a chunk; returns the whole change set when this was its last chunk.
    /// After an error the incomplete change set is dropped.
    pub(super) fn push(&mut self, chunk: Chunk) -> Result<Option<ChangeSet>, ReplicationError> {
        let (database, mut data) = match self.pending.take() {
            None => (chunk.database, chunk.data),
            Some((pending, _)) if pending != chunk.database => {
                return Err(ReplicationError::InterleavedChunk {
                    pending: pending.as_str().to_string(),
                    received: chunk.database.as_str().to_string(),
                });
            }
            Some((pending, mut data)) => {
                if (data.len() + chunk.data.len()) as u64 > self.limit {
                    return Err(ReplicationError::OversizedChangeSet {
                        database: pending.as_str().to_string(),
                    });
                }
                data.extend_from_slice(&chunk.data);
                (pending, data)
            }
        };
        if data.len() as u64 > self.limit {
            return Err(ReplicationError::OversizedChangeSet {
                database: database.as_str().to_string(),
            });
        }
        let Some(crc64) = chunk.crc64 else {
            self.pending = Some((database, data));
            return Ok(None);
        };
        if data.is_empty() {
            return Err(ReplicationError::EmptyChangeSet {
                database: database.as_str().to_string(),
            });
        }
        data.shrink_to_fit();
        Ok(Some(ChangeSet {
            database,
            ltx: data,
            crc64,
            shared_txid: chunk.shared_txid,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(name: &str) -> DatabaseName {
        DatabaseName::parse("test", name.to_string()).unwrap()
    }

    /// A chunk; the last carries the CRC 7.
    fn chunk(database: &str, data: Vec<u8>, last: bool) -> Chunk {
        Chunk {
            database: name(database),
            data,
            crc64: last.then_some(7),
            shared_txid: None,
        }
    }

    fn change_set(database: &str, ltx: Vec<u8>) -> ChangeSet {
        ChangeSet {
            database: name(database),
            ltx,
            crc64: 7,
            shared_txid: None,
        }
    }

    fn bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn splitting_and_reassembling_gives_back_the_change_set() {
        for len in [
            1,
            100,
            CHUNK_SIZE - 1,
            CHUNK_SIZE,
            CHUNK_SIZE + 1,
            3 * CHUNK_SIZE + 7,
        ] {
            let original = bytes(len);
            let pieces: Vec<_> = Pieces::new(original.clone()).collect();
            assert_eq!(pieces.len(), len.div_ceil(CHUNK_SIZE), "length {len}");
            assert!(pieces.iter().all(|(piece, _)| piece.len() <= CHUNK_SIZE));
            let lasts: Vec<bool> = pieces.iter().map(|(_, last)| *last).collect();
            assert_eq!(lasts.iter().filter(|&&last| last).count(), 1);
            assert_eq!(lasts.last(), Some(&true));

            let mut reassembler = Reassembler::new(u64::MAX);
            let mut whole = None;
            for (piece, last) in pieces {
                assert!(whole.is_none(), "nothing may follow the last chunk");
                whole = reassembler.push(chunk("app.db", piece, last)).unwrap();
            }
            assert_eq!(whole, Some(change_set("app.db", original)));
            assert!(reassembler.pending().is_none());
        }
    }

    #[test]
    fn an_empty_change_set_is_one_last_piece_and_is_refused() {
        let pieces: Vec<_> = Pieces::new(Vec::new()).collect();
        assert_eq!(pieces, vec![(Vec::new(), true)]);
        let mut reassembler = Reassembler::new(100);
        assert!(matches!(
            reassembler.push(chunk("app.db", Vec::new(), true)),
            Err(ReplicationError::EmptyChangeSet { .. })
        ));
    }

    #[test]
    fn chunks_of_another_database_may_not_interleave() {
        let mut reassembler = Reassembler::new(100);
        assert!(
            reassembler
                .push(chunk("a.db", vec![1], false))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            reassembler
                .pending()
                .map(|(database, received)| (database.as_str(), received)),
            Some(("a.db", 1))
        );
        let error = reassembler.push(chunk("b.db", vec![2], true)).unwrap_err();
        assert!(matches!(
            error,
            ReplicationError::InterleavedChunk { ref pending, ref received }
                if pending == "a.db" && received == "b.db"
        ));
        assert!(
            reassembler.pending().is_none(),
            "the broken change set is dropped"
        );
    }

    #[test]
    fn a_change_set_over_the_limit_is_refused() {
        let mut reassembler = Reassembler::new(10);
        reassembler.push(chunk("a.db", vec![0; 6], false)).unwrap();
        assert!(matches!(
            reassembler.push(chunk("a.db", vec![0; 5], true)),
            Err(ReplicationError::OversizedChangeSet { .. })
        ));
        assert!(matches!(
            reassembler.push(chunk("a.db", vec![0; 11], true)),
            Err(ReplicationError::OversizedChangeSet { .. })
        ));
        assert_eq!(
            reassembler.push(chunk("a.db", vec![0; 10], true)).unwrap(),
            Some(change_set("a.db", vec![0; 10]))
        );
    }

    #[test]
    fn clear_drops_an_incomplete_change_set() {
        let mut reassembler = Reassembler::new(100);
        reassembler.push(chunk("a.db", vec![1], false)).unwrap();
        reassembler.clear();
        assert_eq!(
            reassembler.push(chunk("b.db", vec![2], true)).unwrap(),
            Some(change_set("b.db", vec![2]))
        );
    }
}
