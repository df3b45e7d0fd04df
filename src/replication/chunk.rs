//! Splitting a change set into `LtxChunk` messages and putting it back together.
//!
//! Invariants: every piece is at most [`CHUNK_SIZE`] bytes and only the last has
//! `last` set; a change set of at most one chunk is moved, not copied. The
//! [`Reassembler`] accepts chunks of one database until one carries the change
//! set's CRC (the last), refuses a change set larger than its limit (refusing the
//! chunk that would pass it), a chunk of another database while a change set is
//! incomplete, and an empty change set. It holds at most its memory bound plus
//! one chunk of a change set, handing the bytes before out to be spooled to a
//! file, so a snapshot of a large database never has to fit in memory. It
//! computes the CRC of what arrived as it goes; the replica compares it with the
//! CRC the last chunk carried before the store sees the change set.

use crate::ltx::TxId;

use super::crc::ChangeSetCrc;
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
    /// Its LTX bytes after the first `spilled` (all of them when none were).
    pub(super) ltx: Vec<u8>,
    /// How many of its first bytes were handed out to be spooled
    /// ([`Pushed::Spill`]).
    pub(super) spilled: u64,
    /// The CRC its last chunk carried.
    pub(super) crc64: u64,
    /// The CRC of what arrived, to compare with `crc64`.
    pub(super) computed_crc64: u64,
    /// For a snapshot sent because the histories diverged, the newest TXID this
    /// replica's history shares with the primary's, as its last chunk said.
    pub(super) shared_txid: Option<TxId>,
}

/// What a chunk did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pushed {
    /// The change set is incomplete.
    Incomplete,
    /// The change set is incomplete, and these are its next bytes, more than may
    /// be held in memory: they must be appended to its spool file.
    Spill(Vec<u8>),
    /// The change set is complete.
    Complete(ChangeSet),
}

/// The change set being reassembled.
#[derive(Debug)]
struct Pending {
    database: DatabaseName,
    /// Its bytes after the spilled ones.
    held: Vec<u8>,
    spilled: u64,
    crc: ChangeSetCrc,
}

/// Collects the chunks of one change set at a time.
#[derive(Debug)]
pub(super) struct Reassembler {
    limit: u64,
    max_held: usize,
    pending: Option<Pending>,
}

impl Reassembler {
    /// A reassembler that refuses change sets larger than `limit` bytes and holds
    /// at most about `max_held` bytes of one in memory (plus one chunk).
    pub(super) fn new(limit: u64, max_held: usize) -> Reassembler {
        Reassembler {
            limit,
            max_held,
            pending: None,
        }
    }

    /// The database whose change set is incomplete and how many of its bytes
    /// have arrived, if any.
    pub(super) fn pending(&self) -> Option<(&DatabaseName, u64)> {
        self.pending.as_ref().map(|pending| {
            (
                &pending.database,
                pending.spilled + pending.held.len() as u64,
            )
        })
    }

    /// Forgets an incomplete change set (the stream it came on is gone).
    pub(super) fn clear(&mut self) {
        self.pending = None;
    }

    /// Adds a chunk. After an error the incomplete change set is dropped.
    pub(super) fn push(&mut self, chunk: Chunk) -> Result<Pushed, ReplicationError> {
        let mut pending = match self.pending.take() {
            None => Pending {
                crc: ChangeSetCrc::new(chunk.database.as_str()),
                database: chunk.database,
                held: Vec::new(),
                spilled: 0,
            },
            Some(pending) if pending.database != chunk.database => {
                return Err(ReplicationError::InterleavedChunk {
                    pending: pending.database.as_str().to_string(),
                    received: chunk.database.as_str().to_string(),
                });
            }
            Some(pending) => pending,
        };
        let received = pending.spilled + pending.held.len() as u64;
        if received + chunk.data.len() as u64 > self.limit {
            return Err(ReplicationError::OversizedChangeSet {
                database: pending.database.as_str().to_string(),
            });
        }
        pending.crc.update(&chunk.data);
        if pending.held.is_empty() {
            // A change set of one chunk is moved, not copied.
            pending.held = chunk.data;
        } else {
            pending.held.extend_from_slice(&chunk.data);
        }
        let Some(crc64) = chunk.crc64 else {
            if pending.held.len() >= self.max_held {
                let spill = std::mem::take(&mut pending.held);
                pending.spilled += spill.len() as u64;
                self.pending = Some(pending);
                return Ok(Pushed::Spill(spill));
            }
            self.pending = Some(pending);
            return Ok(Pushed::Incomplete);
        };
        if pending.spilled == 0 && pending.held.is_empty() {
            return Err(ReplicationError::EmptyChangeSet {
                database: pending.database.as_str().to_string(),
            });
        }
        pending.held.shrink_to_fit();
        Ok(Pushed::Complete(ChangeSet {
            database: pending.database,
            ltx: pending.held,
            spilled: pending.spilled,
            crc64,
            computed_crc64: pending.crc.value(),
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

    /// The change set of `ltx`, received whole (its last chunk said CRC 7).
    fn change_set(database: &str, ltx: Vec<u8>) -> Pushed {
        Pushed::Complete(ChangeSet {
            database: name(database),
            computed_crc64: ChangeSetCrc::of(database, &ltx),
            ltx,
            spilled: 0,
            crc64: 7,
            shared_txid: None,
        })
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

            let mut reassembler = Reassembler::new(u64::MAX, usize::MAX);
            let mut whole = None;
            for (piece, last) in pieces {
                assert!(whole.is_none(), "nothing may follow the last chunk");
                match reassembler.push(chunk("app.db", piece, last)).unwrap() {
                    Pushed::Incomplete => {}
                    complete => whole = Some(complete),
                }
            }
            assert_eq!(whole, Some(change_set("app.db", original)));
            assert!(reassembler.pending().is_none());
        }
    }

    #[test]
    fn an_empty_change_set_is_one_last_piece_and_is_refused() {
        let pieces: Vec<_> = Pieces::new(Vec::new()).collect();
        assert_eq!(pieces, vec![(Vec::new(), true)]);
        let mut reassembler = Reassembler::new(100, 100);
        assert!(matches!(
            reassembler.push(chunk("app.db", Vec::new(), true)),
            Err(ReplicationError::EmptyChangeSet { .. })
        ));
    }

    #[test]
    fn chunks_of_another_database_may_not_interleave() {
        let mut reassembler = Reassembler::new(100, 100);
        assert_eq!(
            reassembler.push(chunk("a.db", vec![1], false)).unwrap(),
            Pushed::Incomplete
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
        let mut reassembler = Reassembler::new(10, 10);
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
            change_set("a.db", vec![0; 10])
        );
    }

    #[test]
    fn clear_drops_an_incomplete_change_set() {
        let mut reassembler = Reassembler::new(100, 100);
        reassembler.push(chunk("a.db", vec![1], false)).unwrap();
        reassembler.clear();
        assert_eq!(
            reassembler.push(chunk("b.db", vec![2], true)).unwrap(),
            change_set("b.db", vec![2])
        );
    }

    #[test]
    fn bytes_past_the_memory_bound_are_handed_out_to_spool() {
        let original = bytes(10 * CHUNK_SIZE + 5);
        let mut reassembler = Reassembler::new(u64::MAX, 3 * CHUNK_SIZE);
        let mut spooled = Vec::new();
        let mut whole = None;
        for (piece, last) in Pieces::new(original.clone()) {
            match reassembler.push(chunk("app.db", piece, last)).unwrap() {
                Pushed::Incomplete => {}
                Pushed::Spill(bytes) => {
                    assert!(bytes.len() <= 3 * CHUNK_SIZE, "held at most the bound");
                    spooled.extend_from_slice(&bytes);
                }
                Pushed::Complete(change_set) => whole = Some(change_set),
            }
        }
        let whole = whole.expect("the last chunk completes the change set");
        assert_eq!(whole.spilled, spooled.len() as u64);
        assert_eq!(
            spooled.len(),
            9 * CHUNK_SIZE,
            "three spills of three chunks"
        );
        spooled.extend_from_slice(&whole.ltx);
        assert_eq!(spooled, original);
        assert_eq!(whole.computed_crc64, ChangeSetCrc::of("app.db", &original));
        assert!(reassembler.pending().is_none());
    }

    #[test]
    fn the_computed_crc_covers_the_database_name() {
        let mut reassembler = Reassembler::new(100, 100);
        let Pushed::Complete(change_set) =
            reassembler.push(chunk("b.db", vec![1, 2], true)).unwrap()
        else {
            panic!("one last chunk is a whole change set");
        };
        assert_eq!(change_set.computed_crc64, ChangeSetCrc::of("b.db", &[1, 2]));
        assert_ne!(change_set.computed_crc64, ChangeSetCrc::of("a.db", &[1, 2]));
    }
}
