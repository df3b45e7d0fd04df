//! The replica's side of replication: checking a change set from the primary
//! against the database's position and applying it to the database file.
//!
//! Invariants:
//! - Nothing is written unless the change set follows the position (TXID and
//!   pre-apply checksum) and the checksum it leads to, computed from the page
//!   checksums before any write, equals its post-apply checksum.
//! - The room the database file needs past its end is allocated before the change
//!   set is logged, so a full disk refuses it whole rather than cutting its pages
//!   short (where the filesystem has `fallocate`).
//! - The change set is in the log before its pages reach the database file, so a
//!   crash part-way through is repaired at start-up by applying it again (a change
//!   set holds whole pages, so applying it twice gives the same content).
//! - A change set in a file is never held in memory whole: it is decoded once to
//!   check it and again to write its pages. A second decoding that differs stops
//!   the writing and forgets the position, so the primary sends a snapshot.
//! - Keeping readers out while pages are written is the caller's job (the store
//!   holds SQLite's locks); this module only writes.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;

use crate::ltx::{self, Checksum, Decoder, Header, Trailer};

use super::{CaptureState, Database, Position};
use crate::store::log::{FileRangeReader, LtxBytes};
use crate::store::{StoreError, WRITE_PIECE_BYTES};

/// The read buffer for decoding a change set kept in a file.
const FILE_READ_BUFFER: usize = 1 << 20;

/// The LTX bytes of a change set from the primary: in memory, or, for one too
/// large to hold there (a snapshot of a large database), in a file.
#[derive(Debug)]
pub enum ChangeSetBytes {
    /// The whole change set.
    InMemory(Vec<u8>),
    /// Bytes `offset..offset + len` of `file`.
    InFile {
        /// The file that holds them (the replica's spool file, or the log).
        file: File,
        /// Where they start.
        offset: u64,
        /// How many there are.
        len: u64,
    },
}

impl ChangeSetBytes {
    fn as_log_bytes(&self) -> LtxBytes<'_> {
        match self {
            ChangeSetBytes::InMemory(bytes) => LtxBytes::Memory(bytes),
            ChangeSetBytes::InFile { file, offset, len } => LtxBytes::File {
                file,
                offset: *offset,
                len: *len,
            },
        }
    }

    /// Decodes the change set's header alone.
    pub fn header(&self, database: &str) -> Result<Header, StoreError> {
        let mut bytes = [0u8; ltx::HEADER_SIZE];
        let available = match self {
            ChangeSetBytes::InMemory(ltx) => {
                let available = ltx.len().min(ltx::HEADER_SIZE);
                bytes[..available].copy_from_slice(&ltx[..available]);
                available
            }
            ChangeSetBytes::InFile { file, offset, len } => {
                let available = (*len).min(ltx::HEADER_SIZE as u64) as usize;
                file.read_exact_at(&mut bytes[..available], *offset)
                    .map_err(|source| StoreError::Io {
                        context: format!("read a change set of {database}"),
                        source,
                    })?;
                available
            }
        };
        Header::decode(&bytes[..available]).map_err(|error| StoreError::ChangeSetRejected {
            database: database.to_string(),
            reason: error.to_string(),
        })
    }

    /// Decodes the change set, checking its format and file checksum, and hands
    /// each page to `visit` in order; returns the header and trailer.
    fn for_each_page(
        &self,
        database: &str,
        visit: impl FnMut(u32, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(Header, Trailer), StoreError> {
        match self {
            ChangeSetBytes::InMemory(bytes) => decode_pages(database, &bytes[..], visit),
            ChangeSetBytes::InFile { file, offset, len } => {
                let mut reader = FileRangeReader::new(file, *offset, *len);
                let decoded = decode_pages(
                    database,
                    BufReader::with_capacity(FILE_READ_BUFFER, &mut reader),
                    visit,
                );
                match reader.take_read_error() {
                    Some(source) => Err(StoreError::Io {
                        context: format!("read a change set of {database}"),
                        source,
                    }),
                    None => decoded,
                }
            }
        }
    }
}

/// Decodes one LTX file from `reader`, handing each page to `visit`.
fn decode_pages(
    database: &str,
    reader: impl Read,
    mut visit: impl FnMut(u32, &[u8]) -> Result<(), StoreError>,
) -> Result<(Header, Trailer), StoreError> {
    let rejected = |error: ltx::LtxError| StoreError::ChangeSetRejected {
        database: database.to_string(),
        reason: error.to_string(),
    };
    let mut decoder = Decoder::new(reader).map_err(rejected)?;
    let header = *decoder.header();
    let mut page = vec![0u8; header.page_size as usize];
    while let Some(pgno) = decoder.next_page_into(&mut page).map_err(rejected)? {
        visit(pgno, &page)?;
    }
    let trailer = decoder.finish().map_err(rejected)?;
    Ok((header, trailer))
}

/// A change set from the primary, decoded and verified, not yet applied.
#[derive(Debug)]
pub struct ReceivedChangeSet {
    header: Header,
    /// The pages it writes, in increasing order.
    page_numbers: Vec<u32>,
    /// Their page checksums, in the same order.
    page_checksums: Vec<u64>,
    /// Whether page 1 of the content after it says WAL mode, when it holds page 1.
    wal_mode_after: Option<bool>,
    post_apply: Checksum,
    /// The pages' bytes, kept from decoding a change set that was in memory; one
    /// in a file is decoded again to write its pages.
    decoded_pages: Option<Vec<Vec<u8>>>,
    bytes: ChangeSetBytes,
}

impl ReceivedChangeSet {
    /// Decodes `ltx` completely, checking its format and file checksum. Only the
    /// pages of a change set in memory are kept in memory.
    pub fn decode(database: &str, ltx: ChangeSetBytes) -> Result<ReceivedChangeSet, StoreError> {
        let keep_pages = matches!(ltx, ChangeSetBytes::InMemory(_));
        let mut page_numbers = Vec::new();
        let mut page_checksums = Vec::new();
        let mut wal_mode_after = None;
        let mut decoded_pages = Vec::new();
        let (header, trailer) = ltx.for_each_page(database, |pgno, page| {
            page_numbers.push(pgno);
            page_checksums.push(ltx::page_checksum(pgno, page).0);
            if pgno == 1 {
                wal_mode_after = Some(page.get(18) == Some(&2));
            }
            if keep_pages {
                decoded_pages.push(page.to_vec());
            }
            Ok(())
        })?;
        Ok(ReceivedChangeSet {
            header,
            page_numbers,
            page_checksums,
            wal_mode_after,
            post_apply: trailer.post_apply_checksum,
            decoded_pages: keep_pages.then_some(decoded_pages),
            bytes: ltx,
        })
    }

    /// The change set's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Whether page 1 of the content after this change set says WAL mode, when
    /// the change set holds page 1.
    pub fn wal_mode_after(&self) -> Option<bool> {
        self.wal_mode_after
    }
}

/// A change set in the log whose pages are not written yet.
#[derive(Debug)]
pub struct LoggedChangeSet {
    received: ReceivedChangeSet,
    /// The XOR of all page checksums after it.
    xor: u64,
    /// It replaces every page (a snapshot or a page-size change).
    full: bool,
}

/// What applying a change set did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedChangeSet {
    /// The database's new position.
    pub position: Position,
    /// The page size after applying.
    pub page_size: u32,
    /// The database size in pages after applying.
    pub commit: u32,
    /// The pages written, in increasing order.
    pub pages: Vec<u32>,
    /// Whether the database is in WAL mode after applying.
    pub wal_mode: bool,
}

impl Database {
    /// Whether the database's committed content is in WAL mode.
    pub fn is_wal_mode(&self) -> bool {
        self.lock().wal_mode
    }

    /// Checks that a change set from the primary follows the position and leads to
    /// its post-apply checksum, and appends it to the log (a snapshot replaces the
    /// log). Refuses, changing nothing, any other change set. Its pages are
    /// written by [`Database::write_logged`], which must come next: the store
    /// runs one apply at a time.
    pub fn log_received(&self, received: ReceivedChangeSet) -> Result<LoggedChangeSet, StoreError> {
        let mut state = self.lock();
        let header = received.header;
        let rejected = |reason: String| StoreError::ChangeSetRejected {
            database: self.name.clone(),
            reason,
        };
        if !state.wal.committed.is_empty() {
            return Err(rejected(
                "the replica's WAL holds transactions of its own; it must be folded into the database first".into(),
            ));
        }
        // Fencing: the LTX node ID field holds the lease epoch the change set was
        // written under; once a newer primary's change set was applied, an older
        // primary's are refused.
        let seen_epoch = state
            .log
            .records()
            .last()
            .map_or(0, |record| record.header.node_id);
        if header.node_id < seen_epoch {
            return Err(rejected(format!(
                "change set {} was written under lease epoch {} but this replica already follows epoch {}",
                header.filename(),
                header.node_id,
                seen_epoch
            )));
        }
        // What a snapshot discards is logged by the replication client, which
        // knows where the primary's history and this one part.
        let snapshot = header.is_snapshot();
        if !snapshot {
            if header.min_txid.0 != state.position.txid.0 + 1 {
                return Err(rejected(format!(
                    "change set {} does not follow TXID {}",
                    header.filename(),
                    state.position.txid
                )));
            }
            if header.pre_apply_checksum != state.position.checksum {
                return Err(rejected(format!(
                    "change set {} starts from checksum {} but the database is at {}",
                    header.filename(),
                    header.pre_apply_checksum,
                    state.position.checksum
                )));
            }
        }
        let full = snapshot || header.page_size != state.page_size;
        let xor = checksum_after(&state, &received, full);
        let reached = Checksum(xor | Checksum::FLAG);
        if reached != received.post_apply {
            // The database and its bookkeeping disagree with the primary's history:
            // forget the position so that the next connection asks for a snapshot.
            self.set_position(&mut state, Position::UNKNOWN);
            return Err(rejected(format!(
                "change set {} would lead to checksum {} instead of {}",
                header.filename(),
                reached,
                received.post_apply
            )));
        }
        reserve_growth(&state, &self.name, &header)?;
        if snapshot {
            state
                .log
                .replace_with_snapshot(header, received.bytes.as_log_bytes())?;
        } else {
            state.log.append(header, received.bytes.as_log_bytes())?;
        }
        // The primary's history replaces whatever this log lost.
        state.snapshot_next = false;
        Ok(LoggedChangeSet {
            received,
            xor,
            full,
        })
    }

    /// Writes the pages of a change set [`Database::log_received`] logged into the
    /// database file and advances the position. The caller keeps readers out.
    pub fn write_logged(&self, logged: LoggedChangeSet) -> Result<AppliedChangeSet, StoreError> {
        let mut state = self.lock();
        let LoggedChangeSet {
            received,
            xor,
            full,
        } = logged;
        let header = received.header;
        if let Err(error) = write_pages(&state, &self.name, &received) {
            self.set_position(&mut state, Position::UNKNOWN);
            return Err(error);
        }
        let wal_mode = match (header.commit, received.wal_mode_after()) {
            (0, _) => false,
            (_, Some(wal_mode)) => wal_mode,
            (_, None) => state.wal_mode,
        };
        update_page_checksums(&mut state, &received, full, xor);
        state.commit = header.commit;
        self.set_position(
            &mut state,
            Position {
                txid: header.max_txid,
                checksum: received.post_apply,
            },
        );
        // The page checksums now describe the content exactly (the change set
        // verified against them), so a promotion captures without rereading it.
        state.needs_rescan = false;
        state.page_size = header.page_size;
        state.file_page_size = if header.commit == 0 {
            0
        } else {
            header.page_size
        };
        state.wal_mode = wal_mode;
        let position = state.position;
        drop(state);
        self.shared.notify(&self.name);
        Ok(AppliedChangeSet {
            position,
            page_size: header.page_size,
            commit: header.commit,
            pages: received.page_numbers,
            wal_mode,
        })
    }

    /// Copies the WAL's committed transactions into the database file and empties
    /// the WAL, so change sets from the primary can be applied to the file, or so
    /// SQLite reads what the log says before this node leads; what was done, when
    /// there was anything to fold. Needed once when a primary that wrote in WAL
    /// mode becomes a replica, and at each promotion. The caller must keep every reader out
    /// (the wal-index locks) and then advance the wal-index, as for an apply.
    pub(in crate::store) fn fold_wal(&self) -> Result<Option<AppliedChangeSet>, StoreError> {
        let mut state = self.lock();
        let Some(pages) = state.fold_wal_into_database(&self.name)? else {
            return Ok(None);
        };
        Ok(Some(AppliedChangeSet {
            position: state.position,
            page_size: state.page_size,
            commit: state.commit,
            pages,
            wal_mode: state.wal_mode,
        }))
    }

    /// Whether the WAL holds committed transactions not yet in the database file.
    pub(in crate::store) fn has_wal_transactions(&self) -> bool {
        !self.lock().wal.committed.is_empty()
    }

    /// At start-up on a replica: when the database does not match the log's last
    /// change set (a crash while it was being applied), applies that change set
    /// again; when that does not help, forgets the position so that the primary
    /// sends a snapshot.
    pub(in crate::store) fn repair_replica(&self) -> Result<(), StoreError> {
        let mut state = self.lock();
        let _ = state.fold_wal_into_database(&self.name)?;
        if state.position.txid.0 == 0 {
            return Ok(());
        }
        if state.content_matches_position()? {
            return Ok(());
        }
        let Some(last) = state.log.records().last().copied() else {
            self.set_position(&mut state, Position::UNKNOWN);
            return Ok(());
        };
        let (file, offset, len) = state.log.record_in_file(&last)?;
        let bytes = ChangeSetBytes::InFile { file, offset, len };
        let repaired = match ReceivedChangeSet::decode(&self.name, bytes) {
            Ok(received) => {
                write_pages(&state, &self.name, &received)?;
                state.page_size = received.header.page_size;
                state.commit = received.header.commit;
                state.file_page_size = received.header.page_size;
                state.content_matches_position()?
            }
            Err(_) => false,
        };
        if repaired {
            tracing::warn!(database = %self.name, txid = %state.position.txid, "finished applying a change set a crash interrupted");
        } else {
            tracing::warn!(database = %self.name, "the database does not match its log; it will be replaced by a snapshot from the primary");
            self.set_position(&mut state, Position::UNKNOWN);
        }
        state.refresh_wal_mode()?;
        Ok(())
    }
}

impl CaptureState {
    /// Copies the WAL's committed pages into the database file and empties the WAL
    /// (a checkpoint done by ltxfs), so that all of a replica's content is in the
    /// database file, where change sets are applied; returns the pages it wrote,
    /// when it folded anything. Only while no process reads the database: at
    /// start-up, or under the wal-index locks.
    fn fold_wal_into_database(&mut self, name: &str) -> Result<Option<Vec<u32>>, StoreError> {
        let (Some(wal_file), Some(database_file)) =
            (self.wal_file.clone(), self.database_file.clone())
        else {
            return Ok(None);
        };
        if self.wal.committed.is_empty() {
            return Ok(None);
        }
        let Some((page_size, commit)) = self.logical_size()? else {
            return Ok(None);
        };
        let mut folded = Vec::new();
        let io_error = |what: &str, source| StoreError::Io {
            context: format!("{what} of {name}"),
            source,
        };
        let mut page = vec![0u8; page_size as usize];
        for pgno in 1..=commit {
            if self.wal.committed.contains_key(&pgno) {
                self.read_logical_page(pgno, page_size, &mut page)?;
                database_file
                    .write_all_at(&page, u64::from(pgno - 1) * u64::from(page_size))
                    .map_err(|source| io_error("fold the WAL into the database", source))?;
                folded.push(pgno);
            }
        }
        database_file
            .set_len(u64::from(commit) * u64::from(page_size))
            .and_then(|()| database_file.sync_all())
            .map_err(|source| io_error("fold the WAL into the database", source))?;
        wal_file
            .set_len(0)
            .map_err(|source| io_error("empty the WAL", source))?;
        self.wal.reset();
        self.file_page_size = page_size;
        tracing::info!(database = %name, "moved the WAL's transactions into the database file");
        Ok(Some(folded))
    }

    /// Rereads the database file and, when its checksum is the position's, keeps
    /// the page checksums.
    fn content_matches_position(&mut self) -> Result<bool, StoreError> {
        let Some((page_size, commit)) = self.database_file_size()? else {
            return Ok(self.commit == 0);
        };
        if page_size != self.page_size || commit != self.commit {
            return Ok(false);
        }
        let checksums = self.page_checksums_of_content(page_size, commit)?;
        let xor = checksums.iter().fold(0, |acc, c| acc ^ c);
        if Checksum(xor | Checksum::FLAG) != self.position.checksum {
            return Ok(false);
        }
        self.page_checksums = checksums;
        self.checksum_xor = xor;
        self.needs_rescan = false;
        Ok(true)
    }
}

/// The XOR of the page checksums after applying a change set, computed without
/// changing anything, the same way capture keeps them on the primary.
fn checksum_after(state: &CaptureState, received: &ReceivedChangeSet, full: bool) -> u64 {
    let new = received.page_checksums.iter().fold(0, |acc, c| acc ^ c);
    if full {
        return new;
    }
    let commit = received.header.commit as usize;
    let kept = &state.page_checksums[..commit.min(state.page_checksums.len())];
    let cut = state.page_checksums[kept.len()..]
        .iter()
        .fold(0, |acc, c| acc ^ c);
    let replaced = received.page_numbers.iter().fold(0, |acc, pgno| {
        acc ^ kept.get(*pgno as usize - 1).copied().unwrap_or(0)
    });
    state.checksum_xor ^ cut ^ replaced ^ new
}

/// Folds an applied change set into the page checksums.
fn update_page_checksums(
    state: &mut CaptureState,
    received: &ReceivedChangeSet,
    full: bool,
    xor: u64,
) {
    if full {
        state.page_checksums.clear();
    }
    state
        .page_checksums
        .resize(received.header.commit as usize, 0);
    for (pgno, checksum) in received.page_numbers.iter().zip(&received.page_checksums) {
        state.page_checksums[*pgno as usize - 1] = *checksum;
    }
    state.checksum_xor = xor;
}

/// Allocates the blocks the database file of `database` needs past its end
/// for the change set of `header`, without changing its size, so that a full
/// disk refuses the change set before it is logged instead of cutting its
/// pages short. Filesystems without `fallocate` are written to as before.
fn reserve_growth(state: &CaptureState, database: &str, header: &Header) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    let Some(file) = &state.database_file else {
        return Ok(());
    };
    let io_error = |source| StoreError::Io {
        context: format!(
            "make room for change set {} in {database}",
            header.filename()
        ),
        source,
    };
    let len = file.metadata().map_err(io_error)?.len();
    let size = u64::from(header.commit) * u64::from(header.page_size);
    if size <= len {
        return Ok(());
    }
    loop {
        // SAFETY: the descriptor is open for the call.
        let result = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_KEEP_SIZE,
                len as libc::off_t,
                (size - len) as libc::off_t,
            )
        };
        if result == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => return Ok(()),
            _ => return Err(io_error(error)),
        }
    }
}

/// Writes the pages of `received` into the database file of `database` and
/// sets its size. Runs of consecutive pages go out in one write each.
fn write_pages(
    state: &CaptureState,
    database: &str,
    received: &ReceivedChangeSet,
) -> Result<(), StoreError> {
    let header = &received.header;
    let Some(file) = &state.database_file else {
        return Err(StoreError::Capture {
            database: database.to_string(),
            message: "the database file is not open".into(),
        });
    };
    let io_error = |source| StoreError::Io {
        context: format!("apply change set {} to {database}", header.filename()),
        source,
    };
    let mut writer = PageRunWriter::new(file, header.page_size);
    match &received.decoded_pages {
        Some(pages) => {
            for (pgno, page) in received.page_numbers.iter().zip(pages) {
                writer.write(*pgno, page).map_err(io_error)?;
            }
        }
        None => {
            // Decoded again from its file: the pages must be the ones checked.
            let mut expected = received.page_numbers.iter();
            received.bytes.for_each_page(database, |pgno, page| {
                if expected.next() != Some(&pgno) {
                    return Err(StoreError::ChangeSetRejected {
                        database: database.to_string(),
                        reason: format!(
                            "change set {} changed in its file while it was applied",
                            header.filename()
                        ),
                    });
                }
                writer.write(pgno, page).map_err(io_error)
            })?;
        }
    }
    writer.flush().map_err(io_error)?;
    // Most change sets leave the size as it was, and setting the same length
    // again still costs ext4 a truncation: a seventh of a replica's time.
    let size = u64::from(header.commit) * u64::from(header.page_size);
    if file.metadata().map_err(io_error)?.len() != size {
        file.set_len(size).map_err(io_error)?;
    }
    Ok(())
}

/// Collects consecutive pages and writes each run of up to [`WRITE_PIECE_BYTES`]
/// with one `pwrite`.
struct PageRunWriter<'a> {
    file: &'a File,
    page_size: u64,
    /// The pages of the current run, from page `first`.
    run: Vec<u8>,
    first: u32,
}

impl<'a> PageRunWriter<'a> {
    fn new(file: &'a File, page_size: u32) -> PageRunWriter<'a> {
        PageRunWriter {
            file,
            page_size: u64::from(page_size),
            run: Vec::new(),
            first: 0,
        }
    }

    fn write(&mut self, pgno: u32, page: &[u8]) -> std::io::Result<()> {
        let run_pages = (self.run.len() as u64 / self.page_size) as u32;
        let follows = !self.run.is_empty() && self.first + run_pages == pgno;
        if !follows || self.run.len() + page.len() > WRITE_PIECE_BYTES {
            self.flush()?;
            self.first = pgno;
        }
        self.run.extend_from_slice(page);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.run.is_empty() {
            let offset = u64::from(self.first - 1) * self.page_size;
            self.file.write_all_at(&self.run, offset)?;
            self.run.clear();
        }
        Ok(())
    }
}
