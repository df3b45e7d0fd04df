//! SQLite's write-ahead log layout, as far as capture and crash recovery need it.
//!
//! The WAL is a 32-byte header followed by frames; each frame is a 24-byte header
//! and one page. A frame whose "commit" field is non-zero ends a transaction and
//! gives the database size in pages after it. Frames belong to the current WAL
//! generation only while their salts equal the header's, and SQLite trusts a frame
//! only when the running checksum over header and frames matches.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Size of the WAL file header.
pub const WAL_HEADER_SIZE: u64 = 32;
/// Size of each frame header.
pub const FRAME_HEADER_SIZE: u64 = 24;
const WAL_MAGIC_LITTLE_ENDIAN: u32 = 0x377f_0682;
const WAL_MAGIC_BIG_ENDIAN: u32 = 0x377f_0683;

/// The fields of a WAL header that identify one WAL generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    /// Page size of the frames.
    pub page_size: u32,
    /// First salt; frames carry a copy.
    pub salt1: u32,
    /// Second salt; frames carry a copy.
    pub salt2: u32,
    /// Whether checksums read words big-endian.
    big_endian_checksums: bool,
    /// The running checksum after the header.
    checksum: (u32, u32),
}

impl WalHeader {
    /// Parses a WAL header; `None` when the bytes are not one.
    pub fn parse(bytes: &[u8]) -> Option<WalHeader> {
        let header: &[u8; 32] = bytes.get(..32)?.try_into().ok()?;
        let word = |at: usize| {
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let big_endian_checksums = match word(0) {
            WAL_MAGIC_LITTLE_ENDIAN => false,
            WAL_MAGIC_BIG_ENDIAN => true,
            _ => return None,
        };
        let page_size = match word(8) {
            1 => 65536,
            size => size,
        };
        if !crate::ltx::is_valid_page_size(page_size) {
            return None;
        }
        let checksum = wal_checksum(big_endian_checksums, (0, 0), &header[..24]);
        if checksum != (word(24), word(28)) {
            return None;
        }
        Some(WalHeader {
            page_size,
            salt1: word(16),
            salt2: word(20),
            big_endian_checksums,
            checksum,
        })
    }

    /// The byte offset of frame `index` (0-based).
    pub fn frame_offset(&self, index: u64) -> u64 {
        WAL_HEADER_SIZE + index * (FRAME_HEADER_SIZE + u64::from(self.page_size))
    }
}

/// A frame header's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The page the frame holds.
    pub pgno: u32,
    /// Database size in pages after this frame's transaction, or 0 if it does not
    /// end a transaction.
    pub commit: u32,
    /// Salts copied from the WAL header.
    pub salt1: u32,
    /// Salts copied from the WAL header.
    pub salt2: u32,
    checksum: (u32, u32),
}

impl FrameHeader {
    /// Parses a 24-byte frame header.
    pub fn parse(bytes: &[u8]) -> Option<FrameHeader> {
        let header: &[u8; 24] = bytes.get(..24)?.try_into().ok()?;
        let word = |at: usize| {
            u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        Some(FrameHeader {
            pgno: word(0),
            commit: word(4),
            salt1: word(8),
            salt2: word(12),
            checksum: (word(16), word(20)),
        })
    }

    /// True when the frame belongs to the generation `header` starts.
    pub fn matches(&self, header: &WalHeader) -> bool {
        self.salt1 == header.salt1 && self.salt2 == header.salt2 && self.pgno != 0
    }
}

/// Bytes of the wal-index (`-shm`) that [`wal_index_after_apply`] rewrites: two
/// copies of the 48-byte header and the 40-byte checkpoint information.
pub const WAL_INDEX_PREFIX: usize = 136;
const WAL_INDEX_HEADER_SIZE: usize = 48;

/// The `isInit` byte of the wal-index header's first copy, the copy readers
/// check first. A reader that finds it 0 takes the index for one being
/// rebuilt: it waits, as behind a writer, while the WAL write and recovery
/// locks are held, and rebuilds the index itself otherwise.
pub const WAL_INDEX_FIRST_IS_INIT: u64 = 12;

/// The start of a wal-index (`-shm` file) after a replica wrote a change set
/// straight into the database file, or `None` when `prefix` holds no valid
/// header (SQLite then rebuilds the index, so there is nothing to update).
/// The header is taken from the second copy, which SQLite writes first, so an
/// index whose first copy was marked uninitialised
/// ([`WAL_INDEX_FIRST_IS_INIT`]) is advanced too.
///
/// Readers compare the wal-index header with their own copy at the start of each
/// read transaction and drop their page cache when it changed, so the change
/// counter is advanced; the header says the WAL is empty (the replica's content is
/// all in the database file) and gives the new size in pages. The header's fields
/// are in the host's byte order, as SQLite keeps them in shared memory.
pub fn wal_index_after_apply(prefix: &[u8], page_size: u32, pages: u32) -> Option<Vec<u8>> {
    let prefix = prefix.get(..WAL_INDEX_PREFIX)?;
    let header = &prefix[WAL_INDEX_HEADER_SIZE..2 * WAL_INDEX_HEADER_SIZE];
    let word = |at: usize| {
        u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let is_init = header[12] != 0;
    let big_endian_checksums = header[13] != 0;
    let intact = wal_checksum(big_endian_checksums, (0, 0), &header[..40]) == (word(40), word(44));
    if !is_init || !intact {
        return None;
    }
    let mut new = header.to_vec();
    new[8..12].copy_from_slice(&word(8).wrapping_add(1).to_ne_bytes());
    // SQLite stores the page size in 16 bits: 65536 becomes 1.
    let encoded_page_size = ((page_size & 0xff00) | (page_size >> 16)) as u16;
    new[14..16].copy_from_slice(&encoded_page_size.to_ne_bytes());
    new[16..20].copy_from_slice(&0u32.to_ne_bytes());
    new[20..24].copy_from_slice(&pages.to_ne_bytes());
    let (c0, c1) = wal_checksum(big_endian_checksums, (0, 0), &new[..40]);
    new[40..44].copy_from_slice(&c0.to_ne_bytes());
    new[44..48].copy_from_slice(&c1.to_ne_bytes());
    let mut out = Vec::with_capacity(WAL_INDEX_PREFIX);
    out.extend_from_slice(&new);
    out.extend_from_slice(&new);
    out.extend_from_slice(&prefix[2 * WAL_INDEX_HEADER_SIZE..]);
    // Checkpoint information: nothing is backfilled from the (empty) WAL, and read
    // mark 0 ("the database file alone") is the one readers will take.
    let checkpoint = 2 * WAL_INDEX_HEADER_SIZE;
    out[checkpoint..checkpoint + 8].fill(0);
    out[checkpoint + 32..checkpoint + 36].fill(0);
    Some(out)
}

/// SQLite's WAL checksum: runs over 8-byte chunks, continuing from `start`.
fn wal_checksum(big_endian: bool, start: (u32, u32), data: &[u8]) -> (u32, u32) {
    let (mut s0, mut s1) = start;
    for chunk in data.chunks_exact(8) {
        let read = |bytes: &[u8]| {
            let word = [bytes[0], bytes[1], bytes[2], bytes[3]];
            if big_endian {
                u32::from_be_bytes(word)
            } else {
                u32::from_le_bytes(word)
            }
        };
        s0 = s0.wrapping_add(read(&chunk[..4])).wrapping_add(s1);
        s1 = s1.wrapping_add(read(&chunk[4..])).wrapping_add(s0);
    }
    (s0, s1)
}

/// One committed transaction in a WAL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalTransaction {
    /// Database size in pages after the transaction.
    pub commit: u32,
    /// Its pages: page number to the offset of the page data in its newest frame.
    pub pages: std::collections::BTreeMap<u32, u64>,
    /// Byte offset of its first frame.
    pub start: u64,
    /// Byte offset just past its commit frame.
    pub end: u64,
}

/// The committed content of a WAL as SQLite's recovery would see it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CommittedWal {
    /// The WAL's header, when it has a valid one.
    pub header: Option<WalHeader>,
    /// The committed transactions, oldest first.
    pub transactions: Vec<WalTransaction>,
}

impl CommittedWal {
    /// Database size in pages after the last committed transaction, if any.
    pub fn commit(&self) -> Option<u32> {
        self.transactions
            .last()
            .map(|transaction| transaction.commit)
    }

    /// For each page, the offset of its page data in its newest committed frame.
    pub fn pages(&self) -> std::collections::BTreeMap<u32, u64> {
        let mut pages = std::collections::BTreeMap::new();
        for transaction in &self.transactions {
            pages.extend(
                transaction
                    .pages
                    .iter()
                    .map(|(&pgno, &offset)| (pgno, offset)),
            );
        }
        pages
    }

    /// Byte offset just past the last committed frame (the first frame's offset
    /// when nothing is committed).
    pub fn end(&self) -> u64 {
        self.transactions
            .last()
            .map_or(WAL_HEADER_SIZE, |transaction| transaction.end)
    }
}

/// Reads `wal` the way SQLite recovers it: frames count while salts and the running
/// checksum hold, and only up to the last commit frame.
pub fn read_committed(wal: &File) -> std::io::Result<CommittedWal> {
    let mut header_bytes = [0u8; 32];
    if !read_exact_at(wal, &mut header_bytes, 0)? {
        return Ok(CommittedWal::default());
    }
    let Some(header) = WalHeader::parse(&header_bytes) else {
        return Ok(CommittedWal::default());
    };
    let mut result = CommittedWal {
        header: Some(header),
        transactions: Vec::new(),
    };
    let mut pending = WalTransaction {
        start: WAL_HEADER_SIZE,
        ..WalTransaction::default()
    };
    let mut checksum = header.checksum;
    let frame_size = FRAME_HEADER_SIZE + u64::from(header.page_size);
    let mut frame = vec![0u8; frame_size as usize];
    for index in 0.. {
        let offset = header.frame_offset(index);
        if !read_exact_at(wal, &mut frame, offset)? {
            break;
        }
        let Some(frame_header) = FrameHeader::parse(&frame) else {
            break;
        };
        if !frame_header.matches(&header) {
            break;
        }
        let running = wal_checksum(header.big_endian_checksums, checksum, &frame[..8]);
        let running = wal_checksum(header.big_endian_checksums, running, &frame[24..]);
        if running != frame_header.checksum {
            break;
        }
        checksum = running;
        pending
            .pages
            .insert(frame_header.pgno, offset + FRAME_HEADER_SIZE);
        if frame_header.commit != 0 {
            pending.commit = frame_header.commit;
            pending.end = offset + frame_size;
            let next = WalTransaction {
                start: pending.end,
                ..WalTransaction::default()
            };
            result
                .transactions
                .push(std::mem::replace(&mut pending, next));
        }
    }
    Ok(result)
}

/// Fills `buffer` from `offset`; false when the file ends first.
pub fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> std::io::Result<bool> {
    match file.read_exact_at(buffer, offset) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(error) => Err(error),
    }
}

/// WAL bytes as SQLite writes them, for tests of what reads them.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A valid little-endian WAL header of a generation with salts `salts`.
    pub(crate) fn header(page_size: u32, salts: (u32, u32)) -> Vec<u8> {
        let mut header = Vec::with_capacity(WAL_HEADER_SIZE as usize);
        for word in [
            WAL_MAGIC_LITTLE_ENDIAN,
            3_007_000,
            page_size,
            0,
            salts.0,
            salts.1,
        ] {
            header.extend_from_slice(&word.to_be_bytes());
        }
        let (s0, s1) = wal_checksum(false, (0, 0), &header);
        header.extend_from_slice(&s0.to_be_bytes());
        header.extend_from_slice(&s1.to_be_bytes());
        header
    }

    /// A frame holding `page` as page `pgno`; `commit` is the database size
    /// after its transaction when it ends one, else 0. Capture reads frames
    /// by their salts, so the checksum is left zero.
    pub(crate) fn frame(pgno: u32, commit: u32, salts: (u32, u32), page: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(FRAME_HEADER_SIZE as usize + page.len());
        for word in [pgno, commit, salts.0, salts.1, 0, 0] {
            frame.extend_from_slice(&word.to_be_bytes());
        }
        frame.extend_from_slice(page);
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid wal-index start as SQLite leaves it after some transactions.
    fn wal_index(change: u32, frames: u32, pages: u32) -> Vec<u8> {
        let mut header = vec![0u8; WAL_INDEX_HEADER_SIZE];
        header[0..4].copy_from_slice(&3_007_000u32.to_ne_bytes());
        header[8..12].copy_from_slice(&change.to_ne_bytes());
        header[12] = 1;
        header[14..16].copy_from_slice(&4096u16.to_ne_bytes());
        header[16..20].copy_from_slice(&frames.to_ne_bytes());
        header[20..24].copy_from_slice(&pages.to_ne_bytes());
        let (c0, c1) = wal_checksum(false, (0, 0), &header[..40]);
        header[40..44].copy_from_slice(&c0.to_ne_bytes());
        header[44..48].copy_from_slice(&c1.to_ne_bytes());
        let mut prefix = header.clone();
        prefix.extend_from_slice(&header);
        let mut checkpoint = vec![0u8; 40];
        checkpoint[0..4].copy_from_slice(&frames.to_ne_bytes());
        checkpoint[4..8].copy_from_slice(&frames.to_ne_bytes());
        prefix.extend_from_slice(&checkpoint);
        prefix
    }

    #[test]
    fn wal_index_after_apply_advances_the_change_counter_and_empties_the_wal() {
        let before = wal_index(7, 12, 30);
        let after = wal_index_after_apply(&before, 4096, 42).unwrap();
        assert_eq!(after.len(), WAL_INDEX_PREFIX);
        let word = |at: usize| u32::from_ne_bytes(after[at..at + 4].try_into().unwrap());
        assert_eq!(word(8), 8, "change counter");
        assert_eq!(word(16), 0, "no frames");
        assert_eq!(word(20), 42, "pages");
        assert_eq!(after[..48], after[48..96], "both copies");
        assert_eq!(
            wal_checksum(false, (0, 0), &after[..40]),
            (word(40), word(44))
        );
        assert_eq!((word(96), word(100)), (0, 0), "backfill and read mark 0");
    }

    #[test]
    fn a_wal_index_whose_first_copy_holds_readers_off_is_advanced_from_the_second() {
        let mut held_off = wal_index(7, 12, 30);
        held_off[WAL_INDEX_FIRST_IS_INIT as usize] = 0;
        let after = wal_index_after_apply(&held_off, 4096, 42).unwrap();
        assert_eq!(
            after,
            wal_index_after_apply(&wal_index(7, 12, 30), 4096, 42).unwrap()
        );
        assert_eq!(
            after[WAL_INDEX_FIRST_IS_INIT as usize], 1,
            "readers let in again"
        );
    }

    #[test]
    fn wal_index_without_a_valid_header_is_left_for_sqlite_to_rebuild() {
        assert_eq!(wal_index_after_apply(&[0u8; 10], 4096, 1), None);
        assert_eq!(
            wal_index_after_apply(&[0u8; WAL_INDEX_PREFIX], 4096, 1),
            None
        );
        let mut torn = wal_index(7, 12, 30);
        torn[50] ^= 1;
        assert_eq!(wal_index_after_apply(&torn, 4096, 1), None);
    }
}
