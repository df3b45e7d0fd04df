//! The change-set log of one database: an append-only file of LTX change sets.
//!
//! Layout: a sequence of records, each an 8-byte big-endian length followed by that
//! many bytes of one complete LTX file, then zero padding (the file grows in
//! preallocated chunks; a zero length ends the records). Appending never creates,
//! renames or fsyncs a file; [`ChangeLog::sync`] is called when SQLite asks for durability of this
//! database's files, so a change set is durable no later than SQLite's commit.
//!
//! Invariants:
//! - Records are in TXID order without gaps: each record's min TXID is one more
//!   than the previous record's max TXID.
//! - A record that is incomplete or fails LTX verification can only be the tail
//!   left by a crash; opening the log cuts it off and says so in the log.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::ltx::{self, Header, Trailer, TxId};

use super::{StoreError, WRITE_PIECE_BYTES, write_all_at_in_pieces};

const LENGTH_PREFIX: u64 = 8;
/// The most bytes of change sets after the log's base snapshot that a snapshot
/// is compacted from ([`ChangeLog::history_until`]); with more, the snapshot is
/// copied from the database a few pages per hold of its capture lock instead
/// (`Database::write_snapshot`). Compaction holds the pages those change sets
/// touched in memory and decodes every one of them, so a long history would
/// cost memory and time proportional to it, not to the database.
pub const MAX_HISTORY_FOR_SNAPSHOT: u64 = 16 << 20;

/// The log grows in zero-filled chunks of this size, so that appending overwrites
/// blocks that already exist and syncing it flushes data without a metadata commit.
/// A length prefix of zero marks the end of the records.
const PREALLOCATION: u64 = 4 << 20;
/// The zeros the log is extended with, one write at a time (see
/// [`WRITE_PIECE_BYTES`]).
static ZEROS: [u8; WRITE_PIECE_BYTES] = [0; WRITE_PIECE_BYTES];
/// The largest record accepted when reading: a change set of a database at the
/// largest size SQLite allows with 64 KiB pages would not be held in memory anyway.
const MAX_RECORD_SIZE: u64 = 1 << 34;

/// The LTX bytes of one change set to put in the log: in memory, or a range of
/// a file (a change set a replica spooled while it arrived).
#[derive(Debug, Clone, Copy)]
pub enum LtxBytes<'a> {
    /// Bytes in memory.
    Memory(&'a [u8]),
    /// Bytes `offset..offset + len` of `file`.
    File {
        /// The file that holds them.
        file: &'a File,
        /// Where they start.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
}

impl LtxBytes<'_> {
    /// How many bytes there are.
    pub fn size(&self) -> u64 {
        match self {
            LtxBytes::Memory(bytes) => bytes.len() as u64,
            LtxBytes::File { len, .. } => *len,
        }
    }

    /// Writes them into `to` at offset `at`; from a file, the kernel copies them
    /// (`copy_file_range`) when it can.
    fn write_at(&self, to: &File, at: u64) -> io::Result<()> {
        match *self {
            LtxBytes::Memory(bytes) => write_all_at_in_pieces(to, bytes, at),
            LtxBytes::File { file, offset, len } => copy_range(file, offset, len, to, at),
        }
    }
}

/// Copies bytes `offset..offset + len` of `from` into `to` at `at`.
fn copy_range(from: &File, offset: u64, len: u64, to: &File, at: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut copied = 0u64;
    while copied < len {
        let mut from_offset = (offset + copied) as libc::loff_t;
        let mut to_offset = (at + copied) as libc::loff_t;
        let chunk = (len - copied).min(COPY_CHUNK) as usize;
        // SAFETY: both descriptors are open for the call, and the offsets are
        // valid pointers to local variables.
        let result = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut from_offset,
                to.as_raw_fd(),
                &mut to_offset,
                chunk,
                0,
            )
        };
        match result {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended after {copied} of {len} bytes"),
                ));
            }
            count if count > 0 => copied += count as u64,
            _ => {
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EINTR) => {}
                    // Not between these files (another filesystem, or a kernel
                    // without it): copy through memory.
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                        return copy_range_through_memory(
                            from,
                            offset + copied,
                            len - copied,
                            to,
                            at + copied,
                        );
                    }
                    _ => return Err(error),
                }
            }
        }
    }
    Ok(())
}

/// Copies bytes `offset..offset + len` of `from` into `to` at `at` through a
/// buffer.
fn copy_range_through_memory(
    from: &File,
    offset: u64,
    len: u64,
    to: &File,
    at: u64,
) -> io::Result<()> {
    let mut buffer = vec![0u8; COPY_BUFFER.min(len) as usize];
    let mut copied = 0;
    while copied < len {
        let size = (len - copied).min(buffer.len() as u64) as usize;
        from.read_exact_at(&mut buffer[..size], offset + copied)?;
        write_all_at_in_pieces(to, &buffer[..size], at + copied)?;
        copied += size as u64;
    }
    Ok(())
}

/// The most one `copy_file_range` call is asked to copy.
const COPY_CHUNK: u64 = 64 << 20;
/// The buffer of a copy the kernel cannot do.
const COPY_BUFFER: u64 = 1 << 20;

/// Reads a range of a file by position, so the file's own offset does not
/// matter.
#[derive(Debug)]
pub struct FileRangeReader<'a> {
    file: &'a File,
    /// Where the next read starts.
    offset: u64,
    /// Where the range ends.
    end: u64,
    /// The first error reading the file, kept so that a caller can tell it from
    /// bad content once a decoder has turned it into its own error.
    read_error: Option<io::Error>,
}

impl<'a> FileRangeReader<'a> {
    /// Reads bytes `offset..offset + len` of `file`.
    pub fn new(file: &'a File, offset: u64, len: u64) -> FileRangeReader<'a> {
        FileRangeReader {
            file,
            offset,
            end: offset + len,
            read_error: None,
        }
    }

    /// The error reading the file, if one happened.
    pub fn take_read_error(&mut self) -> Option<io::Error> {
        self.read_error.take()
    }
}

impl io::Read for FileRangeReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let size = (self.end - self.offset).min(buffer.len() as u64) as usize;
        if size == 0 {
            return Ok(0);
        }
        let count = self
            .file
            .read_at(&mut buffer[..size], self.offset)
            .and_then(|count| match count {
                0 => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file is shorter than expected",
                )),
                count => Ok(count),
            })
            .inspect_err(|error| {
                self.read_error
                    .get_or_insert_with(|| io::Error::new(error.kind(), error.to_string()));
            })?;
        self.offset += count as u64;
        Ok(count)
    }
}

/// Where one change set sits in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordInfo {
    /// Byte offset of the LTX bytes (after the length prefix).
    pub offset: u64,
    /// Length of the LTX bytes.
    pub len: u64,
    /// The change set's header.
    pub header: Header,
}

/// The last change set in a log: where the database stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogTail {
    /// Its header.
    pub header: Header,
    /// Its trailer (post-apply checksum).
    pub trailer: Trailer,
}

/// What opening a log found when it was damaged in the middle (not a torn tail).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogDamage {
    /// Where the damaged log was moved to.
    pub set_aside: PathBuf,
    /// The highest TXID any readable change set of the damaged log reached.
    pub last_txid: TxId,
}

/// The highest TXID of the readable change sets that start after `from` (past
/// the unreadable record there), found by their LTX magic behind a plausible
/// length; `None` when nothing readable follows.
fn later_records_max_txid(
    file: &File,
    from: u64,
    file_len: u64,
) -> Result<Option<TxId>, StoreError> {
    let read_error = |source| StoreError::Io {
        context: "read the change-set log".to_string(),
        source,
    };
    let mut buffer = vec![0u8; 64 * 1024];
    let mut header_bytes = [0u8; ltx::HEADER_SIZE];
    let mut prefix = [0u8; LENGTH_PREFIX as usize];
    // The unreadable record's own magic is at `from + LENGTH_PREFIX`.
    let mut at = from + LENGTH_PREFIX + 1;
    let mut found: Option<TxId> = None;
    while at + ltx::MAGIC.len() as u64 <= file_len {
        let chunk = (file_len - at).min(buffer.len() as u64) as usize;
        file.read_exact_at(&mut buffer[..chunk], at)
            .map_err(read_error)?;
        let mut next = at + chunk.saturating_sub(ltx::MAGIC.len() - 1).max(1) as u64;
        for index in 0..chunk.saturating_sub(ltx::MAGIC.len() - 1) {
            if buffer[index..index + ltx::MAGIC.len()] != ltx::MAGIC {
                continue;
            }
            let start = at + index as u64;
            if start < LENGTH_PREFIX || start + ltx::HEADER_SIZE as u64 > file_len {
                continue;
            }
            file.read_exact_at(&mut prefix, start - LENGTH_PREFIX)
                .map_err(read_error)?;
            let len = u64::from_be_bytes(prefix);
            file.read_exact_at(&mut header_bytes, start)
                .map_err(read_error)?;
            let plausible = len >= (ltx::HEADER_SIZE + ltx::TRAILER_SIZE) as u64
                && len <= MAX_RECORD_SIZE
                && start + len <= file_len;
            if let (true, Ok(header)) = (plausible, Header::decode(&header_bytes)) {
                found = Some(found.map_or(header.max_txid, |txid| txid.max(header.max_txid)));
                // The next record, if any, starts right after this one.
                next = start + len;
                break;
            }
        }
        at = next;
    }
    Ok(found)
}

/// An open change-set log.
#[derive(Debug)]
pub struct ChangeLog {
    path: PathBuf,
    file: File,
    len: u64,
    /// Bytes the file holds, records plus zero padding.
    allocated: u64,
    unsynced: bool,
    records: Vec<RecordInfo>,
    /// Set when opening found damage in the middle and started a new log.
    damage: Option<LogDamage>,
    /// Appends fail as on a full disk (tests of what a failed append leaves).
    #[cfg(test)]
    pub(crate) fail_appends: bool,
}

impl ChangeLog {
    /// The bytes before each record's LTX bytes (its length).
    pub const RECORD_PREFIX: u64 = LENGTH_PREFIX;

    /// Opens (or creates) the log at `path`, cutting off a torn tail, and returns it
    /// with its last change set.
    pub fn open(path: &Path) -> Result<(ChangeLog, Option<LogTail>), StoreError> {
        let io_error = |what: &str, source: io::Error| StoreError::Io {
            context: format!("{what} {}", path.display()),
            source,
        };
        // A compaction a crash interrupted left its half-written log beside.
        match std::fs::remove_file(compacting_path(path)) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => {
                return Err(io_error("remove the unfinished compaction of", error));
            }
            _ => {}
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| io_error("open", source))?;
        let file_len = file
            .metadata()
            .map_err(|source| io_error("stat", source))?
            .len();
        let mut records = Vec::new();
        let mut offset = 0;
        let mut prefix = [0u8; LENGTH_PREFIX as usize];
        let mut header_bytes = [0u8; ltx::HEADER_SIZE];
        while offset + LENGTH_PREFIX <= file_len {
            file.read_exact_at(&mut prefix, offset)
                .map_err(|source| io_error("read", source))?;
            let len = u64::from_be_bytes(prefix);
            let start = offset + LENGTH_PREFIX;
            if len < (ltx::HEADER_SIZE + ltx::TRAILER_SIZE) as u64
                || len > MAX_RECORD_SIZE
                || start + len > file_len
            {
                break;
            }
            file.read_exact_at(&mut header_bytes, start)
                .map_err(|source| io_error("read", source))?;
            let Ok(header) = Header::decode(&header_bytes) else {
                break;
            };
            records.push(RecordInfo {
                offset: start,
                len,
                header,
            });
            offset = start + len;
        }
        let mut log = ChangeLog {
            path: path.to_path_buf(),
            file,
            len: offset,
            allocated: file_len,
            unsynced: false,
            records,
            damage: None,
            #[cfg(test)]
            fail_appends: false,
        };
        // Only the newest records can be torn; verify from the end until one is whole.
        let tail = loop {
            let Some(last) = log.records.last().copied() else {
                break None;
            };
            let mut reader = FileRangeReader::new(&log.file, last.offset, last.len);
            let verified = ltx::verify(io::BufReader::with_capacity(
                COPY_BUFFER as usize,
                &mut reader,
            ));
            if let Some(source) = reader.take_read_error() {
                return Err(io_error("read", source));
            }
            match verified {
                Ok(summary) => {
                    break Some(LogTail {
                        header: summary.header,
                        trailer: summary.trailer,
                    });
                }
                Err(error) => {
                    tracing::warn!(log = %path.display(), %error, txid = %last.header.max_txid, "dropping a damaged change set at the end of the log (left by a crash)");
                    log.records.pop();
                    log.len = last.offset - LENGTH_PREFIX;
                }
            }
        };
        if log.len != file_len && !log.tail_is_zero(file_len)? {
            // Change sets after the unreadable one: damage in the middle, not a
            // tail a crash tore. Cutting them off would silently lose them.
            if let Some(later) = later_records_max_txid(&log.file, log.len, file_len)? {
                return ChangeLog::set_aside(log, tail, later);
            }
            tracing::warn!(log = %path.display(), kept = log.len, size = file_len, "cutting off an incomplete tail of the change-set log");
            log.file
                .set_len(log.len)
                .map_err(|source| io_error("truncate", source))?;
            log.allocated = log.len;
        }
        Ok((log, tail))
    }

    /// Moves a log damaged in the middle aside and starts an empty one in its
    /// place; the caller records the database anew, after the highest TXID seen.
    fn set_aside(
        damaged: ChangeLog,
        tail: Option<LogTail>,
        later_txid: TxId,
    ) -> Result<(ChangeLog, Option<LogTail>), StoreError> {
        let path = damaged.path.clone();
        let kept_txid = tail.map_or(TxId(0), |tail| tail.header.max_txid);
        let last_txid = kept_txid.max(later_txid);
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_millis());
        let file_name = path.file_name().map_or_else(
            || "log".to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        let set_aside = path.with_file_name(format!("{file_name}.damaged-{millis}"));
        let damaged_at = damaged.len;
        drop(damaged);
        std::fs::rename(&path, &set_aside).map_err(|source| StoreError::Io {
            context: format!("set the damaged log {} aside", path.display()),
            source,
        })?;
        tracing::error!(
            log = %path.display(),
            set_aside = %set_aside.display(),
            damaged_at,
            readable_until = %kept_txid,
            last_txid = %last_txid,
            "the change-set log is damaged in the middle: change sets follow one that cannot be read; it was set aside and this database's history starts again from its current content, as a snapshot after the last TXID (replicas get that snapshot)"
        );
        let (mut log, _) = ChangeLog::open(&path)?;
        log.damage = Some(LogDamage {
            set_aside,
            last_txid,
        });
        Ok((log, None))
    }

    /// The change sets up to and including the one ending at `txid` with
    /// `checksum`, to be read without the database's lock; `None` unless the
    /// log starts with a snapshot and holds a change set ending exactly there.
    /// At most `max_history` bytes of change sets may follow the base snapshot
    /// (see [`MAX_HISTORY_FOR_SNAPSHOT`]).
    pub fn history_until(
        &self,
        txid: TxId,
        checksum: ltx::Checksum,
        max_history: u64,
    ) -> Result<Option<LoggedHistory>, StoreError> {
        let Some(first) = self.records.first() else {
            return Ok(None);
        };
        let end = self
            .records
            .iter()
            .position(|record| record.header.max_txid == txid);
        let (true, Some(end)) = (first.header.is_snapshot(), end) else {
            return Ok(None);
        };
        if self.post_apply_checksum(&self.records[end])? != checksum {
            return Ok(None);
        }
        // Compaction holds the pages the later change sets touched: only a short
        // history after the base is worth it.
        let later: u64 = self.records[1..=end].iter().map(|record| record.len).sum();
        if later > max_history {
            return Ok(None);
        }
        let source = self.file.try_clone().map_err(|source| StoreError::Io {
            context: format!("open {} again", self.path.display()),
            source,
        })?;
        Ok(Some(LoggedHistory {
            path: self.path.clone(),
            source,
            records: self.records[..=end].to_vec(),
        }))
    }

    /// What opening found when the log was damaged in the middle, once.
    pub fn take_damage(&mut self) -> Option<LogDamage> {
        self.damage.take()
    }

    /// Appends one encoded change set.
    pub fn append(&mut self, header: Header, ltx: LtxBytes<'_>) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.fail_appends {
            return Err(StoreError::Io {
                context: format!("append to {} (failed by a test)", self.path.display()),
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        let ltx_len = ltx.size();
        let record_len = LENGTH_PREFIX + ltx_len;
        self.preallocate(self.len + record_len + LENGTH_PREFIX)?;
        let written = match ltx {
            LtxBytes::Memory(bytes) => {
                // One write for the prefix and the bytes of a small change set.
                let mut record = Vec::with_capacity(record_len as usize);
                record.extend_from_slice(&ltx_len.to_be_bytes());
                record.extend_from_slice(bytes);
                write_all_at_in_pieces(&self.file, &record, self.len)
            }
            LtxBytes::File { .. } => self
                .file
                .write_all_at(&ltx_len.to_be_bytes(), self.len)
                .and_then(|()| ltx.write_at(&self.file, self.len + LENGTH_PREFIX)),
        };
        written.map_err(|source| StoreError::Io {
            context: format!("append to {}", self.path.display()),
            source,
        })?;
        self.records.push(RecordInfo {
            offset: self.len + LENGTH_PREFIX,
            len: ltx_len,
            header,
        });
        self.len += record_len;
        self.unsynced = true;
        Ok(())
    }

    /// Makes sure the file holds at least `end` bytes (zeros past the records).
    fn preallocate(&mut self, end: u64) -> Result<(), StoreError> {
        if end <= self.allocated {
            return Ok(());
        }
        let new_allocated = end.div_ceil(PREALLOCATION) * PREALLOCATION;
        let mut offset = self.allocated;
        while offset < new_allocated {
            let piece = (new_allocated - offset).min(WRITE_PIECE_BYTES as u64) as usize;
            self.file
                .write_all_at(&ZEROS[..piece], offset)
                .map_err(|source| StoreError::Io {
                    context: format!("extend {}", self.path.display()),
                    source,
                })?;
            offset += piece as u64;
        }
        self.allocated = new_allocated;
        Ok(())
    }

    /// True when every byte from the end of the records to `file_len` is zero.
    fn tail_is_zero(&self, file_len: u64) -> Result<bool, StoreError> {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut offset = self.len;
        while offset < file_len {
            let chunk = (file_len - offset).min(buffer.len() as u64) as usize;
            self.file
                .read_exact_at(&mut buffer[..chunk], offset)
                .map_err(|source| StoreError::Io {
                    context: format!("read {}", self.path.display()),
                    source,
                })?;
            if buffer[..chunk].iter().any(|&byte| byte != 0) {
                return Ok(false);
            }
            offset += chunk as u64;
        }
        Ok(true)
    }

    /// Makes every appended change set durable; cheap when nothing is new.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.unsynced {
            self.file.sync_data().map_err(|source| StoreError::Io {
                context: format!("fsync {}", self.path.display()),
                source,
            })?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// Replaces the whole log with one snapshot change set (a replica bootstrapped
    /// by the primary's snapshot keeps no older history). `header` is the one
    /// `ltx` starts with, which the caller has decoded and verified. When `ltx`
    /// is a file holding only room for the record's length and then the
    /// snapshot, that file becomes the log itself, without a copy.
    pub fn replace_with_snapshot(
        &mut self,
        header: Header,
        ltx: LtxBytes<'_>,
    ) -> Result<(), StoreError> {
        if let LtxBytes::File {
            file,
            offset: LENGTH_PREFIX,
            len,
        } = ltx
            && self.adopt_snapshot_file(header, file, len)?
        {
            return Ok(());
        }
        let path = self.path.clone();
        self.replace_contents(|file| {
            LtxBytes::Memory(&ltx.size().to_be_bytes())
                .write_at(file, 0)
                .and_then(|()| ltx.write_at(file, LENGTH_PREFIX))
                .map_err(|source| StoreError::Io {
                    context: format!("write {}", path.display()),
                    source,
                })?;
            let record = RecordInfo {
                offset: LENGTH_PREFIX,
                len: ltx.size(),
                header,
            };
            Ok((LENGTH_PREFIX + ltx.size(), vec![record]))
        })
    }

    /// Makes `file` the log when it holds exactly a length prefix's room and a
    /// snapshot of `len` bytes: writes the prefix, syncs the file, gives it a name
    /// beside the log (through `/proc/self/fd`, as it may have none) and renames
    /// that over the log. False, changing nothing the log depends on, when the
    /// file holds more or cannot be linked there (another filesystem).
    fn adopt_snapshot_file(
        &mut self,
        header: Header,
        file: &File,
        len: u64,
    ) -> Result<bool, StoreError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let io_error = |what: &str, source: io::Error| StoreError::Io {
            context: format!("{what} {}", self.path.display()),
            source,
        };
        let size = file
            .metadata()
            .map_err(|source| io_error("measure the snapshot for", source))?
            .len();
        if size != LENGTH_PREFIX + len {
            return Ok(false);
        }
        file.write_all_at(&len.to_be_bytes(), 0)
            .and_then(|()| file.sync_all())
            .map_err(|source| io_error("write the snapshot for", source))?;
        let new_path = self.path.with_extension("replacing");
        // A name left by a crash while replacing the log before.
        let _ = std::fs::remove_file(&new_path);
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let to = std::ffi::CString::new(new_path.as_os_str().as_bytes());
        let (Ok(from), Ok(to)) = (from, to) else {
            return Ok(false);
        };
        // SAFETY: both paths are NUL-terminated strings that outlive the call.
        let linked = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if linked != 0 {
            let error = io::Error::last_os_error();
            tracing::debug!(log = %self.path.display(), %error, "copying a snapshot into the log instead of linking it");
            return Ok(false);
        }
        std::fs::rename(&new_path, &self.path).map_err(|source| io_error("replace", source))?;
        self.sync_directory()?;
        let file = file
            .try_clone()
            .map_err(|source| io_error("reopen", source))?;
        self.take_replacement(
            file,
            size,
            vec![RecordInfo {
                offset: LENGTH_PREFIX,
                len,
                header,
            }],
        );
        Ok(true)
    }

    /// Syncs the directory of the log, after its name was given to a new file.
    fn sync_directory(&self) -> Result<(), StoreError> {
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|source| StoreError::Io {
                    context: format!("sync the directory of {}", self.path.display()),
                    source,
                })?;
        }
        Ok(())
    }

    /// Writes new content for the log beside it with `write`, which returns the
    /// records it wrote (verified before, so they are not reread) and how many
    /// bytes they take; syncs it, renames it over the log and takes it as the
    /// log's content.
    fn replace_contents(
        &mut self,
        write: impl FnOnce(&File) -> Result<(u64, Vec<RecordInfo>), StoreError>,
    ) -> Result<(), StoreError> {
        let io_error = |what: &str, source: io::Error| StoreError::Io {
            context: format!("{what} {}", self.path.display()),
            source,
        };
        let new_path = self.path.with_extension("replacing");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&new_path)
            .map_err(|source| io_error("create", source))?;
        let (len, records) = write(&file)?;
        file.sync_all()
            .map_err(|source| io_error("fsync", source))?;
        std::fs::rename(&new_path, &self.path).map_err(|source| io_error("replace", source))?;
        self.sync_directory()?;
        debug_assert_eq!(records.last().map_or(0, |last| last.offset + last.len), len);
        self.take_replacement(file, len, records);
        Ok(())
    }

    /// Takes `file`, synced and renamed over the log, as the log: `len` bytes
    /// holding `records`.
    fn take_replacement(&mut self, file: File, len: u64, records: Vec<RecordInfo>) {
        *self = ChangeLog {
            path: self.path.clone(),
            file,
            len,
            allocated: len,
            unsynced: false,
            records,
            damage: None,
            #[cfg(test)]
            fail_appends: false,
        };
    }

    /// The post-apply checksum in a record's trailer.
    pub fn post_apply_checksum(&self, record: &RecordInfo) -> Result<ltx::Checksum, StoreError> {
        post_apply_checksum(&self.file, &self.path, record)
    }

    /// The records, oldest first.
    pub fn records(&self) -> &[RecordInfo] {
        &self.records
    }

    /// The LTX bytes of one record, left in the log's file (a record can be as
    /// large as the database).
    pub fn record_in_file(&self, record: &RecordInfo) -> Result<(File, u64, u64), StoreError> {
        Ok((self.reopened()?, record.offset, record.len))
    }

    /// Another handle on the log's file.
    fn reopened(&self) -> Result<File, StoreError> {
        self.file.try_clone().map_err(|source| StoreError::Io {
            context: format!("reopen {}", self.path.display()),
            source,
        })
    }

    /// The LTX bytes of one record.
    pub fn read(&self, record: &RecordInfo) -> Result<Vec<u8>, StoreError> {
        let mut bytes = vec![0u8; record.len as usize];
        self.file
            .read_exact_at(&mut bytes, record.offset)
            .map_err(|source| StoreError::Io {
                context: format!("read {}", self.path.display()),
                source,
            })?;
        Ok(bytes)
    }
}

/// How much history a log keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Change sets older than this (by their timestamp) are merged into the base.
    pub max_age: std::time::Duration,
    /// When the log is larger than this, the oldest change sets are merged too.
    pub max_bytes: Option<u64>,
    /// Change sets after this TXID are not merged for their age (a backup
    /// destination does not have them yet), while the log stays within
    /// `max_bytes`, or [`DEFAULT_PINNED_LOG_BYTES`] without it.
    pub keep_after: Option<TxId>,
}

/// How large the log may grow to keep change sets a backup destination does
/// not have yet, when `data.max-size` does not say.
pub const DEFAULT_PINNED_LOG_BYTES: u64 = 1 << 30;

impl ChangeLog {
    /// The log's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the log holds no change set.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Merges the oldest change sets into one, so that none but the last is older
    /// than the policy allows and the log fits its size bound where merging can
    /// achieve that. The log stays replayable from its start: the merged change set
    /// covers exactly the TXIDs it replaces. The new log is written beside the old
    /// one, synced and renamed over it, so a crash leaves one or the other whole.
    /// Returns how many change sets were merged away. In one call; the store
    /// uses the three steps ([`ChangeLog::plan_compaction`],
    /// [`CompactionPlan::merge`], [`ChangeLog::finish_compaction`]) so that it
    /// holds the database's lock only for the first and the last.
    pub fn enforce(
        &mut self,
        policy: RetentionPolicy,
        now_millis: u64,
        compress: bool,
    ) -> Result<usize, StoreError> {
        match self.plan_compaction(policy, now_millis)? {
            Some(plan) => self.finish_compaction(plan.merge(compress)?),
            None => Ok(0),
        }
    }

    /// Chooses the oldest change sets to merge under `policy`, if at least two.
    pub fn plan_compaction(
        &self,
        policy: RetentionPolicy,
        now_millis: u64,
    ) -> Result<Option<CompactionPlan>, StoreError> {
        let cutoff = now_millis.saturating_sub(policy.max_age.as_millis() as u64);
        let mut too_old = self
            .records
            .iter()
            .take_while(|record| record.header.timestamp < cutoff)
            .count();
        if let Some(keep_after) = policy.keep_after {
            let unpinned = self
                .records
                .iter()
                .take_while(|record| record.header.max_txid <= keep_after)
                .count();
            if self.len <= policy.max_bytes.unwrap_or(DEFAULT_PINNED_LOG_BYTES) {
                too_old = too_old.min(unpinned);
            } else if too_old > unpinned {
                tracing::warn!(
                    log = %self.path.display(),
                    bytes = self.len,
                    backed_up_txid = %keep_after,
                    "the log outgrew its bound while a backup destination is behind: \
                     merging change sets it does not have; it will get a snapshot instead"
                );
            }
        }
        let mut too_large = 0;
        if let Some(max_bytes) = policy.max_bytes {
            let mut remaining = self.len;
            for (index, record) in self.records.iter().enumerate() {
                if remaining <= max_bytes {
                    break;
                }
                remaining -= LENGTH_PREFIX + record.len;
                too_large = index + 1;
            }
        }
        let merge = too_old.max(too_large);
        if merge < 2 {
            return Ok(None);
        }
        // Merging into a base snapshot rewrites the whole database; unless the
        // size bound asks for it, that waits until the old change sets are worth it.
        if let Some((base, old)) = self.records[..merge].split_first()
            && too_large < 2
            && base.header.is_snapshot()
            && old
                .iter()
                .map(|record| record.len)
                .sum::<u64>()
                .saturating_mul(BASE_REWRITE_RATIO)
                < base.len
        {
            return Ok(None);
        }
        Ok(Some(CompactionPlan {
            path: self.path.clone(),
            source: self.reopened()?,
            merged: self.records[..merge].to_vec(),
        }))
    }

    /// Puts a merged change set in place of the change sets it merged, copying
    /// the newer ones after it; returns how many change sets were merged away.
    /// Does nothing, and returns 0, when the log no longer starts with those
    /// change sets (it was replaced meanwhile).
    pub fn finish_compaction(&mut self, merged: MergedChangeSets) -> Result<usize, StoreError> {
        let MergedChangeSets {
            plan,
            file,
            merged_len,
            header,
        } = merged;
        let compacting_path = compacting_path(&self.path);
        if !self.records.starts_with(&plan.merged) {
            let _ = std::fs::remove_file(&compacting_path);
            return Ok(0);
        }
        let io_error = |what: &str, source: io::Error| StoreError::Io {
            context: format!("{what} {}", compacting_path.display()),
            source,
        };
        let count = plan.merged.len();
        let kept_records = &self.records[count..];
        let rest_start = kept_records
            .first()
            .map_or(self.len, |record| record.offset - LENGTH_PREFIX);
        let rest_len = self.len - rest_start;
        // The kept records move to just after the merged one.
        let merged_end = LENGTH_PREFIX + merged_len;
        copy_range(&self.file, rest_start, rest_len, &file, merged_end)
            .and_then(|()| file.write_all_at(&merged_len.to_be_bytes(), 0))
            .and_then(|()| file.sync_all())
            .map_err(|source| io_error("finish", source))?;
        std::fs::rename(&compacting_path, &self.path)
            .map_err(|source| io_error("rename", source))?;
        self.sync_directory()?;
        let records = std::iter::once(RecordInfo {
            offset: LENGTH_PREFIX,
            len: merged_len,
            header,
        })
        .chain(kept_records.iter().map(|record| RecordInfo {
            offset: record.offset - rest_start + merged_end,
            ..*record
        }))
        .collect();
        let len = merged_end + rest_len;
        self.take_replacement(file, len, records);
        Ok(count - 1)
    }
}

/// Change sets older than the retention period are merged into the log's base
/// snapshot only once they take at least 1/`BASE_REWRITE_RATIO` of its size (or
/// the size bound requires it). Merging rewrites the whole base, so this bounds
/// the rewriting to a few times the volume of changes, instead of the whole
/// database at every pass; retention is how long change sets are kept at least.
const BASE_REWRITE_RATIO: u64 = 4;

/// Where a compaction writes the new log before renaming it over the log.
fn compacting_path(log_path: &Path) -> PathBuf {
    log_path.with_extension("compacting")
}

/// The oldest change sets of a log, to merge into one
/// ([`ChangeLog::plan_compaction`]).
#[derive(Debug)]
pub struct CompactionPlan {
    path: PathBuf,
    /// The log's file, read by position: its records do not change while
    /// newer ones are appended.
    source: File,
    merged: Vec<RecordInfo>,
}

/// The post-apply checksum in the trailer of `record` of the log `file` at `path`.
fn post_apply_checksum(
    file: &File,
    path: &Path,
    record: &RecordInfo,
) -> Result<ltx::Checksum, StoreError> {
    let mut trailer = [0u8; ltx::TRAILER_SIZE];
    let at = record.offset + record.len - ltx::TRAILER_SIZE as u64;
    file.read_exact_at(&mut trailer, at)
        .map_err(|source| StoreError::Io {
            context: format!("read {}", path.display()),
            source,
        })?;
    Trailer::decode(&trailer)
        .map(|trailer| trailer.post_apply_checksum)
        .map_err(|error| StoreError::Capture {
            database: path.display().to_string(),
            message: format!("a logged change set has a bad trailer: {error}"),
        })
}

/// The log's change sets up to some position, read without any lock: records
/// never change once written (appends go after them, and replacements are new
/// files renamed over the log, while this holds the old one open).
#[derive(Debug)]
pub struct LoggedHistory {
    path: PathBuf,
    source: File,
    records: Vec<RecordInfo>,
}

impl LoggedHistory {
    /// Writes one snapshot of everything the change sets record to `out`, its
    /// pages streamed from the base snapshot under the later change sets' pages
    /// (see [`ltx::compact_onto_snapshot`]), stamped with at least lease epoch
    /// `epoch`; returns its header.
    pub fn write_snapshot(
        &self,
        compress: bool,
        epoch: u64,
        out: &mut dyn Write,
    ) -> Result<Header, StoreError> {
        let reader = |record: &RecordInfo| {
            io::BufReader::with_capacity(
                COPY_BUFFER as usize,
                FileRangeReader::new(&self.source, record.offset, record.len),
            )
        };
        let (base, rest) = self
            .records
            .split_first()
            .ok_or_else(|| StoreError::Capture {
                database: String::new(),
                message: "a snapshot from an empty log".to_string(),
            })?;
        // The log's records were verified when they were written or received:
        // the base is read once, checked by the output's checksum as it goes.
        let base_post_apply = post_apply_checksum(&self.source, &self.path, base)?;
        let options = ltx::OntoSnapshot {
            compress,
            min_node_id: epoch,
            trusted_base: Some(base_post_apply),
        };
        ltx::compact_onto_snapshot_with(|| Ok(reader(base)), rest.iter().map(reader), options, out)
            .map_err(|error| StoreError::Capture {
                database: String::new(),
                message: format!("could not write a snapshot from the log: {error}"),
            })
    }
}

/// The merged change set, written beside the log after room for its length,
/// not yet in the log ([`ChangeLog::finish_compaction`]).
#[derive(Debug)]
pub struct MergedChangeSets {
    plan: CompactionPlan,
    file: File,
    merged_len: u64,
    header: Header,
}

impl CompactionPlan {
    /// Merges the planned change sets into a new file beside the log, reading
    /// them from the log as it is written, never whole in memory (a base
    /// snapshot is streamed, see [`ltx::compact_onto_snapshot`]). Needs no lock:
    /// the planned records never change.
    pub fn merge(self, compress: bool) -> Result<MergedChangeSets, StoreError> {
        let compacting_path = compacting_path(&self.path);
        let io_error = |what: &str, source: io::Error| StoreError::Io {
            context: format!("{what} {}", compacting_path.display()),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&compacting_path)
            .map_err(|source| io_error("create", source))?;
        let mut out = io::BufWriter::with_capacity(COPY_BUFFER as usize, &file);
        out.write_all(&[0; LENGTH_PREFIX as usize])
            .map_err(|source| io_error("write", source))?;
        let reader = |record: &RecordInfo| {
            io::BufReader::with_capacity(
                COPY_BUFFER as usize,
                FileRangeReader::new(&self.source, record.offset, record.len),
            )
        };
        let header = match self.merged.split_first() {
            Some((base, rest)) if base.header.is_snapshot() => ltx::compact_onto_snapshot(
                || Ok(reader(base)),
                rest.iter().map(reader),
                compress,
                &mut out,
            ),
            _ => ltx::compact(self.merged.iter().map(reader), compress, &mut out),
        }
        .map_err(|error| StoreError::Capture {
            database: self.path.display().to_string(),
            message: format!("compaction failed: {error}"),
        })?;
        out.flush().map_err(|source| io_error("write", source))?;
        drop(out);
        // Synced here, so that finishing, under the database's lock, only syncs
        // the newer change sets it copies.
        file.sync_data()
            .map_err(|source| io_error("fsync", source))?;
        let merged_len = file
            .metadata()
            .map_err(|source| io_error("measure", source))?
            .len()
            - LENGTH_PREFIX;
        Ok(MergedChangeSets {
            plan: self,
            file,
            merged_len,
            header,
        })
    }
}

/// Reads every change set of the log at `path` without changing it (for tools and
/// tests). Stops at the first record that is incomplete.
pub fn read_change_sets(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let data = std::fs::read(path)?;
    let mut sets = Vec::new();
    let mut rest = data.as_slice();
    while rest.len() >= LENGTH_PREFIX as usize {
        let (prefix, after) = rest.split_at(LENGTH_PREFIX as usize);
        let len = u64::from_be_bytes(prefix.try_into().map_err(io::Error::other)?) as usize;
        if len == 0 || after.len() < len {
            break;
        }
        let (record, after) = after.split_at(len);
        sets.push(record.to_vec());
        rest = after;
    }
    Ok(sets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ltx::{Checksum, Encoder, page_checksum};

    const PAGE_SIZE: u32 = 512;

    /// A chain of change sets: a one-page snapshot, then rewrites of page 1.
    fn change_set(txid: u64, timestamp: u64) -> (Header, Vec<u8>) {
        let page_of = |txid: u64| vec![txid as u8; PAGE_SIZE as usize];
        let checksum_after =
            |txid: u64| Checksum(page_checksum(1, &page_of(txid)).0 | Checksum::FLAG);
        let header = Header {
            flags: 0,
            page_size: PAGE_SIZE,
            commit: 1,
            min_txid: TxId(txid),
            max_txid: TxId(txid),
            timestamp,
            pre_apply_checksum: if txid == 1 {
                Checksum(0)
            } else {
                checksum_after(txid - 1)
            },
            wal_offset: 0,
            wal_size: 0,
            wal_salt1: 0,
            wal_salt2: 0,
            node_id: 0,
        };
        let mut encoder = Encoder::new(Vec::new(), header).unwrap();
        encoder.encode_page(1, &page_of(txid)).unwrap();
        encoder.finish(checksum_after(txid)).unwrap();
        (header, encoder.into_inner())
    }

    fn log_with(dir: &Path, count: u64) -> ChangeLog {
        let (mut log, tail) = ChangeLog::open(&dir.join("log")).unwrap();
        assert!(tail.is_none());
        for txid in 1..=count {
            let (header, bytes) = change_set(txid, txid * 1000);
            log.append(header, LtxBytes::Memory(&bytes)).unwrap();
        }
        log
    }

    #[test]
    fn reopening_keeps_records_and_skips_the_zero_padding() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 3);
        let len = log.len();
        drop(log);
        let file_len = std::fs::metadata(dir.path().join("log")).unwrap().len();
        assert_eq!(
            file_len, PREALLOCATION,
            "the log grows in zero-filled chunks"
        );
        let content = std::fs::read(dir.path().join("log")).unwrap();
        assert!(
            content[len as usize..].iter().all(|&byte| byte == 0),
            "the chunk is zero-filled to its end"
        );
        let (log, tail) = ChangeLog::open(&dir.path().join("log")).unwrap();
        assert_eq!(log.len(), len);
        assert_eq!(log.records().len(), 3);
        assert_eq!(tail.unwrap().header.max_txid, TxId(3));
        assert_eq!(read_change_sets(&dir.path().join("log")).unwrap().len(), 3);
    }

    /// A snapshot (change set 1) in an unnamed file in `dir`, after a length
    /// prefix's room, followed by `extra` bytes.
    fn snapshot_in_file(dir: &Path, extra: usize) -> (Header, File, u64) {
        let (header, bytes) = change_set(1, 1000);
        let file = tempfile::tempfile_in(dir).unwrap();
        let mut content = vec![0u8; LENGTH_PREFIX as usize];
        content.extend_from_slice(&bytes);
        content.extend(std::iter::repeat_n(7u8, extra));
        file.write_all_at(&content, 0).unwrap();
        (header, file, bytes.len() as u64)
    }

    #[test]
    fn a_snapshot_file_with_room_for_the_prefix_becomes_the_log() {
        use std::os::unix::fs::MetadataExt;
        for extra in [0, 3] {
            let dir = tempfile::tempdir().unwrap();
            let mut log = log_with(dir.path(), 3);
            let (header, file, len) = snapshot_in_file(dir.path(), extra);
            log.replace_with_snapshot(
                header,
                LtxBytes::File {
                    file: &file,
                    offset: LENGTH_PREFIX,
                    len,
                },
            )
            .unwrap();
            let log_inode = std::fs::metadata(dir.path().join("log")).unwrap().ino();
            let adopted = log_inode == file.metadata().unwrap().ino();
            // A file holding more than the snapshot is copied instead.
            assert_eq!(adopted, extra == 0, "extra bytes: {extra}");
            assert_eq!(log.records().len(), 1);
            drop(log);
            let (log, tail) = ChangeLog::open(&dir.path().join("log")).unwrap();
            assert_eq!(log.records().len(), 1);
            assert_eq!(tail.unwrap().header.max_txid, TxId(1));
            assert!(!dir.path().join("log.replacing").exists());
        }
    }

    #[test]
    fn a_torn_last_record_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 3);
        let (header, bytes) = change_set(4, 4000);
        // A crash in the middle of appending: the prefix and half of the record.
        let mut torn = (bytes.len() as u64).to_be_bytes().to_vec();
        torn.extend_from_slice(&bytes[..bytes.len() / 2]);
        log.file.write_all_at(&torn, log.len()).unwrap();
        drop(log);
        let (mut log, tail) = ChangeLog::open(&dir.path().join("log")).unwrap();
        assert_eq!(log.records().len(), 3);
        assert_eq!(tail.unwrap().header.max_txid, TxId(3));
        // Appending after the cut continues the chain.
        log.append(header, LtxBytes::Memory(&bytes)).unwrap();
        drop(log);
        let (log, tail) = ChangeLog::open(&dir.path().join("log")).unwrap();
        assert_eq!(log.records().len(), 4);
        assert_eq!(tail.unwrap().header.max_txid, TxId(4));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// Any bytes as a log open cleanly or fail with an error; what opens
        /// holds only records inside the file.
        #[test]
        fn prop_a_log_of_any_bytes_opens_or_fails_cleanly(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        ) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("log"), &bytes).unwrap();
            if let Ok((log, _)) = ChangeLog::open(&dir.path().join("log")) {
                for record in log.records() {
                    proptest::prop_assert!(record.offset + record.len <= log.len());
                }
            }
        }

        /// A valid log with a run of bytes overwritten anywhere opens without a
        /// panic, and never with more records than it had.
        #[test]
        fn prop_a_damaged_log_never_panics(
            run in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..64),
            at in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let log = log_with(dir.path(), 3);
            let offset = at.index(log.len() as usize) as u64;
            log.file.write_all_at(&run, offset).unwrap();
            drop(log);
            if let Ok((log, _)) = ChangeLog::open(&dir.path().join("log")) {
                proptest::prop_assert!(log.records().len() <= 3);
            }
        }
    }

    #[test]
    fn a_record_damaged_in_the_middle_sets_the_log_aside_instead_of_cutting_it() {
        for damage_at in [0u64, LENGTH_PREFIX] {
            let dir = tempfile::tempdir().unwrap();
            let log = log_with(dir.path(), 4);
            let second = log.records()[1];
            // Damage the second record's length or its magic: what follows it can
            // no longer be reached by walking the records.
            log.file
                .write_all_at(&[0xee; 2], second.offset - LENGTH_PREFIX + damage_at)
                .unwrap();
            drop(log);
            let (mut log, tail) = ChangeLog::open(&dir.path().join("log")).unwrap();
            assert_eq!(tail, None, "the new log starts empty");
            assert!(log.records().is_empty());
            let damage = log.take_damage().expect("the damage is reported");
            assert_eq!(
                damage.last_txid,
                TxId(4),
                "the TXIDs after the damage are known"
            );
            assert!(damage.set_aside.exists(), "the damaged log is kept");
            assert_eq!(log.take_damage(), None, "reported once");
            drop(log);
            // Opened again, the new log is an ordinary empty one.
            let (mut log, tail) = ChangeLog::open(&dir.path().join("log")).unwrap();
            assert_eq!((tail, log.take_damage()), (None, None));
        }
    }

    #[test]
    fn a_damaged_last_record_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 2);
        let last = log.records()[1];
        // Flip a byte of the last record's page.
        log.file.write_all_at(&[0xff], last.offset + 200).unwrap();
        drop(log);
        let (log, tail) = ChangeLog::open(&dir.path().join("log")).unwrap();
        assert_eq!(log.records().len(), 1);
        assert_eq!(tail.unwrap().header.max_txid, TxId(1));
    }

    /// Change sets stamped before 4000 ms are older than 2 s at 6000 ms.
    const BEFORE_4000_MS: RetentionPolicy = RetentionPolicy {
        max_age: std::time::Duration::from_secs(2),
        max_bytes: None,
        keep_after: None,
    };

    fn txid_ranges(log: &ChangeLog) -> Vec<(u64, u64)> {
        log.records()
            .iter()
            .map(|r| (r.header.min_txid.0, r.header.max_txid.0))
            .collect()
    }

    /// A log whose base snapshot (TXID 1, stamped 1000 ms) holds `pages` pages,
    /// then change sets 2..=`last` (stamped TXID × 1000 ms) that rewrite page 1.
    fn log_with_large_base(dir: &Path, pages: u32, last: u64) -> ChangeLog {
        let page = |pgno: u32, fill: u64| vec![(u64::from(pgno) + fill) as u8; PAGE_SIZE as usize];
        let mut xor = (1..=pages).fold(0, |xor, pgno| xor ^ page_checksum(pgno, &page(pgno, 0)).0);
        let (mut log, _) = ChangeLog::open(&dir.join("log")).unwrap();
        let mut before = Checksum(0);
        let mut page_one = page(1, 0);
        for txid in 1..=last {
            if txid > 1 {
                let new = page(1, txid);
                xor ^= page_checksum(1, &page_one).0 ^ page_checksum(1, &new).0;
                page_one = new;
            }
            let header = Header {
                page_size: PAGE_SIZE,
                commit: pages,
                min_txid: TxId(txid),
                max_txid: TxId(txid),
                timestamp: txid * 1000,
                pre_apply_checksum: before,
                ..Header::default()
            };
            let mut encoder = Encoder::new(Vec::new(), header).unwrap();
            if txid == 1 {
                for pgno in 1..=pages {
                    encoder.encode_page(pgno, &page(pgno, 0)).unwrap();
                }
            } else {
                encoder.encode_page(1, &page_one).unwrap();
            }
            before = Checksum(xor | Checksum::FLAG);
            encoder.finish(before).unwrap();
            log.append(header, LtxBytes::Memory(&encoder.into_inner()))
                .unwrap();
        }
        log
    }

    #[test]
    fn old_change_sets_wait_to_be_merged_into_a_large_base_until_they_are_worth_it() {
        let dir = tempfile::tempdir().unwrap();
        // A base of 64 pages and two old change sets of one page each.
        let mut log = log_with_large_base(dir.path(), 64, 5);
        assert_eq!(log.enforce(BEFORE_4000_MS, 6000, false).unwrap(), 0);
        assert_eq!(log.records().len(), 5, "the base is not rewritten yet");
        // The size bound still merges at once.
        let small = RetentionPolicy {
            max_age: BEFORE_4000_MS.max_age,
            max_bytes: Some(100),
            keep_after: None,
        };
        assert!(log.enforce(small, 6000, false).unwrap() > 0);
        assert_eq!(txid_ranges(&log)[0].0, 1);

        // With a small base, the same old change sets are merged by age.
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_with_large_base(dir.path(), 2, 5);
        assert_eq!(log.enforce(BEFORE_4000_MS, 6000, false).unwrap(), 2);
        assert_eq!(txid_ranges(&log), [(1, 3), (4, 4), (5, 5)]);
    }

    #[test]
    fn change_sets_appended_while_a_compaction_merges_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_with(dir.path(), 4);
        let merged = merge_before_4000_ms(&log);
        // Commits go on while the merge runs without the database's lock.
        for txid in 5..=6 {
            let (header, bytes) = change_set(txid, txid * 1000);
            log.append(header, LtxBytes::Memory(&bytes)).unwrap();
        }
        assert_eq!(log.finish_compaction(merged).unwrap(), 2);
        assert_eq!(txid_ranges(&log), [(1, 3), (4, 4), (5, 5), (6, 6)]);
        assert!(!dir.path().join("log.compacting").exists());
        drop(log);
        let (log, tail) = ChangeLog::open(&dir.path().join("log")).unwrap();
        assert_eq!(txid_ranges(&log), [(1, 3), (4, 4), (5, 5), (6, 6)]);
        assert_eq!(tail.unwrap().header.max_txid, TxId(6));
    }

    /// The first three change sets of `log` (older than 4000 ms) merged.
    fn merge_before_4000_ms(log: &ChangeLog) -> MergedChangeSets {
        let plan = log.plan_compaction(BEFORE_4000_MS, 6000).unwrap().unwrap();
        plan.merge(false).unwrap()
    }

    #[test]
    fn a_compaction_of_a_log_replaced_meanwhile_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_with(dir.path(), 4);
        let merged = merge_before_4000_ms(&log);
        // A replica got a snapshot meanwhile.
        let (header, bytes) = change_set(1, 9000);
        log.replace_with_snapshot(header, LtxBytes::Memory(&bytes))
            .unwrap();
        assert_eq!(log.finish_compaction(merged).unwrap(), 0);
        assert_eq!(txid_ranges(&log), [(1, 1)]);
        assert!(!dir.path().join("log.compacting").exists());
    }

    #[test]
    fn opening_removes_a_compaction_a_crash_left_unfinished() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 4);
        let merged = merge_before_4000_ms(&log);
        assert!(dir.path().join("log.compacting").exists());
        drop((log, merged));
        let (log, _) = ChangeLog::open(&dir.path().join("log")).unwrap();
        assert_eq!(log.records().len(), 4);
        assert!(!dir.path().join("log.compacting").exists());
    }

    #[test]
    fn retention_merges_old_records_by_age_and_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_with(dir.path(), 6);
        let keep_all = RetentionPolicy {
            max_age: std::time::Duration::from_secs(3600),
            max_bytes: None,
            keep_after: None,
        };
        assert_eq!(log.enforce(keep_all, 6000, false).unwrap(), 0);
        // Change sets stamped before 4000 ms (TXIDs 1-3) are older than 2 s at 6000 ms.
        let by_age = RetentionPolicy {
            max_age: std::time::Duration::from_secs(2),
            max_bytes: None,
            keep_after: None,
        };
        assert_eq!(log.enforce(by_age, 6000, false).unwrap(), 2);
        let ranges: Vec<_> = log
            .records()
            .iter()
            .map(|r| (r.header.min_txid.0, r.header.max_txid.0))
            .collect();
        assert_eq!(ranges, vec![(1, 3), (4, 4), (5, 5), (6, 6)]);
        // A size bound smaller than the log merges until it fits (or all is merged).
        let by_size = RetentionPolicy {
            max_age: std::time::Duration::from_secs(3600),
            max_bytes: Some(1),
            keep_after: None,
        };
        log.enforce(by_size, 6000, false).unwrap();
        let ranges: Vec<_> = log
            .records()
            .iter()
            .map(|r| (r.header.min_txid.0, r.header.max_txid.0))
            .collect();
        assert_eq!(ranges, vec![(1, 6)]);
        let (reopened, tail) = ChangeLog::open(&dir.path().join("log")).unwrap();
        assert_eq!(reopened.records().len(), 1);
        assert_eq!(tail.unwrap().header.max_txid, TxId(6));
    }

    #[test]
    fn change_sets_a_backup_lacks_are_kept_until_the_size_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_with(dir.path(), 6);
        let ranges = |log: &ChangeLog| -> Vec<(u64, u64)> {
            log.records()
                .iter()
                .map(|r| (r.header.min_txid.0, r.header.max_txid.0))
                .collect()
        };
        // Everything is old, but a destination has only TXID 2.
        let pinned = RetentionPolicy {
            max_age: std::time::Duration::ZERO,
            max_bytes: None,
            keep_after: Some(TxId(2)),
        };
        assert_eq!(log.enforce(pinned, 60_000, false).unwrap(), 1);
        assert_eq!(ranges(&log), vec![(1, 2), (3, 3), (4, 4), (5, 5), (6, 6)]);
        // Past the size bound, the pin gives way.
        let over_bound = RetentionPolicy {
            max_bytes: Some(log.len() - 1),
            ..pinned
        };
        log.enforce(over_bound, 60_000, false).unwrap();
        assert_eq!(ranges(&log), vec![(1, 6)]);
    }
}
