//! Rebuilds a database from a destination's objects, at the newest state, a
//! TXID or a time, with no node running.
//!
//! Each object of the plan streams from the destination to a thread that
//! applies its records page by page to a temporary file beside the output,
//! keeping the database's checksum: each record's pre-apply checksum must
//! equal the database's, and after it the database's checksum must equal its
//! post-apply checksum. An object that fails these checks is read again for
//! its SHA-256, so that a damaged object is named as such. Only a database
//! that passed every check is renamed to the output. Memory is a few batches
//! of download chunks, whatever the database's size; sealed (encrypted)
//! frames are decrypted into a spool file first.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, Take, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::encryption::{AGE_MAGIC, Identities};
use super::layout::{self, ObjectName, RECORD_LENGTH_BYTES, Target};
use super::{BackupError, Destination};
use crate::ltx::{self, Checksum, DatabaseChecksum, Decoder, Header, TxId};

/// What a restore wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The TXID of the last transaction applied.
    pub txid: TxId,
    /// Its commit time, Unix milliseconds.
    pub timestamp_ms: u64,
    /// The database's LTX checksum, as the backup recorded it for that TXID.
    pub checksum: Checksum,
    /// The database's size in bytes.
    pub bytes: u64,
    /// How many objects it read.
    pub objects: usize,
}

/// How far a restore has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreProgress {
    /// Objects read to their end.
    pub objects_done: usize,
    /// Objects the restore plans to read.
    pub objects: usize,
    /// Bytes downloaded, of every object so far.
    pub bytes_done: u64,
    /// The planned objects' bytes, as listed.
    pub bytes: u64,
}

impl RestoreProgress {
    /// Whole percent of the planned bytes downloaded (100 when there are none).
    pub fn percent(&self) -> u64 {
        if self.bytes == 0 {
            100
        } else {
            let percent =
                u128::from(self.bytes_done.min(self.bytes)) * 100 / u128::from(self.bytes);
            percent as u64
        }
    }
}

/// Progress callbacks (for a terminal or a log): called as each batch of a
/// download is handed over and after each object. A restore that plans
/// again (an object went away) starts over from zero.
pub type Progress<'a> = &'a mut (dyn FnMut(RestoreProgress) + Send);

/// Restores `database` from `destination` to `target` into `output` (which
/// is replaced). Temporary files go beside `output`.
pub async fn restore(
    destination: &Destination,
    database: &str,
    target: Target,
    output: &Path,
    identities: Option<&Identities>,
    progress: Progress<'_>,
) -> Result<Restored, BackupError> {
    let mut attempt = 1;
    loop {
        match restore_once(
            destination,
            database,
            target,
            output,
            identities,
            &mut *progress,
        )
        .await
        {
            Err(error) if error.is_not_found() && attempt < RESTORE_ATTEMPTS => {
                // Compaction or retention deleted a planned object after the
                // listing; the objects that replaced it hold the same records.
                tracing::debug!(%error, "an object went away during the restore; planning again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// How many times a restore plans again when an object it planned to read was
/// deleted meanwhile (by the primary's compaction or retention).
const RESTORE_ATTEMPTS: usize = 3;

async fn restore_once(
    destination: &Destination,
    database: &str,
    target: Target,
    output: &Path,
    identities: Option<&Identities>,
    progress: Progress<'_>,
) -> Result<Restored, BackupError> {
    let listed = destination.list(Some(database)).await?;
    if listed.is_empty() {
        return Err(BackupError::NoBackup(database.to_string()));
    }
    let objects: Vec<ObjectName> = listed.iter().map(|listed| listed.name.clone()).collect();
    let plan = layout::plan(database, &objects, target)?;
    let sizes: std::collections::HashMap<&ObjectName, u64> = listed
        .iter()
        .map(|listed| (&listed.name, listed.size))
        .collect();
    let dir = spool_dir_for(output);
    let partial = tempfile::Builder::new()
        .prefix(".ltxfs-restore-")
        .tempfile_in(&dir)
        .map_err(|error| {
            BackupError::local(format!("create a file in {}", dir.display()), error)
        })?;
    let opening = Opening {
        identities: identities.cloned(),
        spool_dir: dir.clone(),
    };
    let mut builder = Builder::new(
        partial
            .as_file()
            .try_clone()
            .map_err(|error| BackupError::local("open the restored file", error))?,
        opening,
    );
    let mut so_far = RestoreProgress {
        objects_done: 0,
        objects: plan.objects.len(),
        bytes_done: 0,
        bytes: plan
            .objects
            .iter()
            .map(|object| sizes.get(object).copied().unwrap_or(0))
            .sum(),
    };
    progress(so_far);
    for object in &plan.objects {
        builder = stream_object(
            destination,
            object,
            builder,
            target,
            &mut so_far,
            &mut *progress,
        )
        .await?;
        so_far.objects_done += 1;
        progress(so_far);
        if builder.reached(target) {
            break;
        }
    }
    let read = so_far.objects_done;
    if let Target::TxId(txid) = target
        && builder.txid != txid
    {
        return Err(BackupError::Plan(layout::PlanError::Unreachable {
            database: database.to_string(),
            target: format!("TXID {txid}"),
            detail: format!("the objects end at TXID {}", builder.txid),
        }));
    }
    let restored = tokio::task::spawn_blocking(move || builder.finish())
        .await
        .map_err(|error| {
            BackupError::local("finish the restore", std::io::Error::other(error))
        })??;
    let restored = Restored {
        objects: read,
        ..restored
    };
    partial.persist(output).map_err(|error| {
        BackupError::local(format!("rename into {}", output.display()), error.error)
    })?;
    if let Ok(directory) = File::open(&dir) {
        let _ = directory.sync_all();
    }
    Ok(restored)
}

/// Downloaded chunks go to the thread that applies them in batches of at least
/// this many bytes (but an object's last): a chunk is a few KiB, and waking that
/// thread for each cost more CPU than applying it.
const BATCH_BYTES: usize = 1 << 20;

/// How many batches may wait for the thread that applies them.
const BATCHES_IN_FLIGHT: usize = 4;

/// Applies `object` to `builder` as it downloads: the chunks go through a
/// bounded channel to a blocking thread that decodes and writes the pages, so
/// the download and the writes overlap and memory stays at a few chunks.
///
/// What is applied is checked by the LTX checksums (each record's file
/// checksum, the page checksums against every pre- and post-apply checksum,
/// the name's), which catch any damaged byte; the SHA-256 of a sound object
/// is therefore not computed here (`ltxfs backup verify` checks it). When an
/// object fails to apply, it is read again for its digest, so a damaged
/// object is named by its digest rather than by the decoding error it caused.
async fn stream_object(
    destination: &Destination,
    object: &ObjectName,
    builder: Builder,
    target: Target,
    so_far: &mut RestoreProgress,
    progress: Progress<'_>,
) -> Result<Builder, BackupError> {
    let mut stream = destination.get(object).await?;
    let (batches, received) = tokio::sync::mpsc::channel(BATCHES_IN_FLIGHT);
    let applied = {
        let object = object.clone();
        tokio::task::spawn_blocking(move || {
            let mut builder = builder;
            let reader = ChannelReader {
                batches: received,
                current: VecDeque::new(),
            };
            builder
                .apply_object(&object, reader, target)
                .map(|()| builder)
        })
    };
    let mut download_error = None;
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    loop {
        let chunk = match stream.next().await {
            Some(Ok(chunk)) => Some(chunk),
            Some(Err(error)) => {
                download_error = Some(error);
                break;
            }
            None => None,
        };
        let end = chunk.is_none();
        if let Some(chunk) = chunk {
            batch_bytes += chunk.len();
            batch.push(chunk);
        }
        if batch_bytes >= BATCH_BYTES || (end && !batch.is_empty()) {
            so_far.bytes_done += batch_bytes as u64;
            progress(*so_far);
            batch_bytes = 0;
            // The applying thread stopped early (an error, or the target
            // reached): the rest is not needed to apply.
            if batches.send(std::mem::take(&mut batch)).await.is_err() {
                break;
            }
        }
        if end {
            break;
        }
    }
    drop(batches);
    let applied = applied
        .await
        .map_err(|error| BackupError::local("apply an object", std::io::Error::other(error)))?;
    if let Some(error) = download_error {
        return Err(error);
    }
    match applied {
        Ok(builder) => Ok(builder),
        Err(error) => {
            let mut stream = destination.get(object).await?;
            let mut digest = Sha256::new();
            while let Some(chunk) = stream.next().await {
                digest.update(&chunk?);
            }
            let sha = digest.finalize();
            if sha.as_slice() != object.sha256 {
                return Err(sha_mismatch(object, &sha));
            }
            Err(error)
        }
    }
}

/// The error of an object whose digest is not the one its name records.
fn sha_mismatch(object: &ObjectName, sha: &[u8]) -> BackupError {
    BackupError::bad_object(
        object,
        format!(
            "its SHA-256 is {} but its name says {}",
            crate::hex::encode(sha),
            crate::hex::encode(&object.sha256)
        ),
    )
}

/// A blocking reader over the batches of chunks a download task sends.
struct ChannelReader {
    batches: tokio::sync::mpsc::Receiver<Vec<bytes::Bytes>>,
    current: VecDeque<bytes::Bytes>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.current.front_mut() {
                Some(chunk) if chunk.is_empty() => {
                    self.current.pop_front();
                }
                Some(chunk) => {
                    let count = buf.len().min(chunk.len());
                    buf[..count].copy_from_slice(&chunk.split_to(count));
                    return Ok(count);
                }
                None => match self.batches.blocking_recv() {
                    Some(batch) => self.current = batch.into(),
                    None => return Ok(0),
                },
            }
        }
    }
}

/// Downloads `object` to an unnamed file in `dir`, checking its SHA-256.
pub(super) async fn download(
    destination: &Destination,
    object: &ObjectName,
    dir: &Path,
) -> Result<File, BackupError> {
    let mut file = tempfile::tempfile_in(dir).map_err(|error| {
        BackupError::local(format!("create a file in {}", dir.display()), error)
    })?;
    append_object(destination, object, &mut file, None).await?;
    file.rewind()
        .map_err(|error| BackupError::local("read a downloaded object", error))?;
    Ok(file)
}

/// Appends `object` to `file`, checking its SHA-256, and feeds its bytes to
/// `whole` too when given (the digest of a merged object).
pub(super) async fn append_object(
    destination: &Destination,
    object: &ObjectName,
    file: &mut File,
    mut whole: Option<&mut Sha256>,
) -> Result<(), BackupError> {
    let mut stream = destination.get(object).await?;
    let mut digest = Sha256::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        digest.update(&chunk);
        if let Some(whole) = whole.as_deref_mut() {
            whole.update(&chunk);
        }
        file.write_all(&chunk)
            .map_err(|error| BackupError::local("write a downloaded object", error))?;
    }
    let sha = digest.finalize();
    if sha.as_slice() != object.sha256 {
        return Err(sha_mismatch(object, &sha));
    }
    Ok(())
}

/// How sealed frames are opened: the identities (none: sealed objects are
/// refused) and where their plaintext is spooled.
#[derive(Debug, Clone)]
pub struct Opening {
    /// The age identities, if any were given.
    pub identities: Option<Identities>,
    /// A directory for temporary files.
    pub spool_dir: PathBuf,
}

/// One record's bytes: what was read to recognise it, then the rest.
pub(super) type Record<'r> = std::io::Chain<Cursor<Vec<u8>>, Take<&'r mut dyn Read>>;

/// Reads the records of an object file one at a time, opening sealed frames.
pub(super) struct Records<'a> {
    outer: BufReader<Box<dyn Read + 'a>>,
    /// The plaintext of the sealed frame being read, if any.
    inner: Option<BufReader<File>>,
    opening: &'a Opening,
}

/// Which reader the next frame comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Outer,
    Inner,
}

impl<'a> Records<'a> {
    pub(super) fn new(object: impl Read + 'a, opening: &'a Opening) -> Records<'a> {
        Records {
            outer: BufReader::new(Box::new(object)),
            inner: None,
            opening,
        }
    }

    fn reader(&mut self, source: Source) -> &mut dyn Read {
        match (source, self.inner.as_mut()) {
            (Source::Inner, Some(inner)) => inner,
            _ => &mut self.outer,
        }
    }

    /// The next record's bytes as a reader ending where the record ends, or
    /// `None` at the end of the object.
    pub(super) fn next_record(
        &mut self,
        object: &ObjectName,
    ) -> Result<Option<Record<'_>>, BackupError> {
        loop {
            let source = if self.inner.is_some() {
                Source::Inner
            } else {
                Source::Outer
            };
            let Some(length) = read_length(self.reader(source), object)? else {
                match source {
                    Source::Inner => {
                        self.inner = None;
                        continue;
                    }
                    Source::Outer => return Ok(None),
                }
            };
            let mut prefix = vec![0u8; AGE_MAGIC.len().min(length as usize)];
            self.reader(source)
                .read_exact(&mut prefix)
                .map_err(|_| BackupError::bad_object(object, "it ends inside a record"))?;
            if prefix.starts_with(AGE_MAGIC) {
                if source == Source::Inner {
                    return Err(BackupError::bad_object(
                        object,
                        "a sealed frame holds another",
                    ));
                }
                let plain = self.open_sealed(object, prefix, length)?;
                self.inner = Some(BufReader::new(plain));
                continue;
            }
            let rest = length - prefix.len() as u64;
            return Ok(Some(
                Cursor::new(prefix).chain(self.reader(source).take(rest)),
            ));
        }
    }

    /// Decrypts the sealed frame of `length` bytes that starts with `prefix`
    /// into a spool file.
    fn open_sealed(
        &mut self,
        object: &ObjectName,
        prefix: Vec<u8>,
        length: u64,
    ) -> Result<File, BackupError> {
        let Some(identities) = &self.opening.identities else {
            return Err(BackupError::Sealed {
                object: object.path(),
            });
        };
        let mut plain = tempfile::tempfile_in(&self.opening.spool_dir)
            .map_err(|error| BackupError::local("spool a decrypted object", error))?;
        let rest = length - prefix.len() as u64;
        let mut sealed = Cursor::new(prefix).chain((&mut self.outer).take(rest));
        identities.open(&mut sealed, &mut plain).map_err(|reason| {
            BackupError::bad_object(object, format!("cannot decrypt it: {reason}"))
        })?;
        plain
            .rewind()
            .map_err(|error| BackupError::local("read a decrypted object", error))?;
        Ok(plain)
    }
}

/// Reads a frame's length, or `None` at the end of the input.
fn read_length(reader: &mut dyn Read, object: &ObjectName) -> Result<Option<u64>, BackupError> {
    let mut length = [0u8; RECORD_LENGTH_BYTES];
    let mut filled = 0;
    while filled < length.len() {
        match reader.read(&mut length[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => {
                return Err(BackupError::bad_object(
                    object,
                    "it ends inside a record's length",
                ));
            }
            Ok(count) => filled += count,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(BackupError::local("read a downloaded object", error)),
        }
    }
    Ok(Some(u64::from_be_bytes(length)))
}

/// A database being rebuilt in a file. Its checksum is kept as records are
/// applied: a page a record replaces is read back from the file to take its
/// checksum out, so no state grows with the database's size.
struct Builder {
    file: File,
    opening: Opening,
    page_size: u32,
    commit: u32,
    txid: TxId,
    timestamp_ms: u64,
    checksum: Option<DatabaseChecksum>,
    /// Set once the target is passed: nothing more is applied.
    done: bool,
    /// Bytes written since the kernel was last asked to start writing back.
    unsynced: u64,
    /// The pages of the record being applied that wait to be written.
    run: PageRun,
}

/// The most bytes of consecutive pages written with one call.
const PAGE_RUN_BYTES: usize = 1 << 20;
/// How many written bytes make the kernel start writing back (without
/// waiting), so the final `fsync` has little left to do.
const WRITEBACK_EVERY_BYTES: u64 = 32 << 20;

/// Consecutive pages waiting to be written in one call. Pages are decoded
/// straight into its buffer, so a page that continues the run is copied once.
#[derive(Default)]
struct PageRun {
    /// The file offset of the first page.
    start: u64,
    /// The run, then room for the page being decoded; it grows to a full run
    /// and one page at most, and is kept for the next record.
    buffer: Vec<u8>,
    /// How many bytes of `buffer` hold the run.
    len: usize,
}

impl PageRun {
    /// Where the next page is decoded: right after the run.
    fn next_page(&mut self, page_size: usize) -> &mut [u8] {
        let end = self.len + page_size;
        if self.buffer.len() < end {
            self.buffer.resize(end, 0);
        }
        &mut self.buffer[self.len..end]
    }

    /// Takes the page decoded by [`PageRun::next_page`] for `offset` into the
    /// run, writing the run before it first if the page does not continue it
    /// or the run is full; returns the page.
    fn push(
        &mut self,
        offset: u64,
        page_size: usize,
        file: &File,
        unsynced: &mut u64,
    ) -> Result<&[u8], BackupError> {
        let continues = self.len > 0 && self.start + self.len as u64 == offset;
        if !continues || self.len >= PAGE_RUN_BYTES {
            let decoded = self.len;
            self.write(file, unsynced)?;
            self.buffer.copy_within(decoded..decoded + page_size, 0);
            self.start = offset;
        }
        let page = self.len..self.len + page_size;
        self.len += page_size;
        Ok(&self.buffer[page])
    }

    /// Writes the run (if any) and empties it; every
    /// `WRITEBACK_EVERY_BYTES`, starts the kernel's writeback of `file`.
    fn write(&mut self, file: &File, unsynced: &mut u64) -> Result<(), BackupError> {
        if self.len == 0 {
            return Ok(());
        }
        crate::store::write_all_at_in_pieces(file, &self.buffer[..self.len], self.start)
            .map_err(|error| BackupError::local("write the restored database", error))?;
        *unsynced += self.len as u64;
        self.len = 0;
        if *unsynced >= WRITEBACK_EVERY_BYTES {
            *unsynced = 0;
            // SAFETY: the descriptor is open for the whole call; the flag only
            // starts writeback and waits for nothing.
            let rc = unsafe {
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
            };
            if rc != 0 {
                return Err(BackupError::local(
                    "start writing the restored database back",
                    std::io::Error::last_os_error(),
                ));
            }
        }
        Ok(())
    }
}

impl Builder {
    fn new(file: File, opening: Opening) -> Builder {
        Builder {
            file,
            opening,
            page_size: 0,
            commit: 0,
            txid: TxId(0),
            timestamp_ms: 0,
            checksum: None,
            done: false,
            unsynced: 0,
            run: PageRun::default(),
        }
    }

    fn reached(&self, target: Target) -> bool {
        match target {
            Target::Latest => false,
            Target::TxId(txid) => self.txid >= txid,
            Target::Time(_) => self.done,
        }
    }

    fn apply_object(
        &mut self,
        object: &ObjectName,
        bytes: impl Read,
        target: Target,
    ) -> Result<(), BackupError> {
        let opening = self.opening.clone();
        let mut records = Records::new(bytes, &opening);
        let mut first = true;
        while let Some(record) = records.next_record(object)? {
            let mut decoder =
                Decoder::new(record).map_err(|error| BackupError::bad_ltx(object, error))?;
            let header = *decoder.header();
            if first && header.pre_apply_checksum != object.pre_apply {
                return Err(BackupError::bad_object(
                    object,
                    "its first record's pre-apply checksum differs from its name's",
                ));
            }
            first = false;
            let stop = match target {
                Target::Latest => false,
                Target::TxId(txid) => header.min_txid > txid,
                Target::Time(millis) => header.timestamp > millis && self.txid.0 > 0,
            };
            if stop {
                self.done = true;
                return Ok(());
            }
            if let Target::TxId(txid) = target
                && header.max_txid > txid
            {
                return Err(BackupError::bad_object(
                    object,
                    format!(
                        "its record {} holds TXIDs {} to {} together, so TXID {txid} alone cannot be restored",
                        header.filename(),
                        header.min_txid,
                        header.max_txid
                    ),
                ));
            }
            self.apply_record(object, &header, &mut decoder)?;
        }
        if self.txid != object.max_txid {
            return Err(BackupError::bad_object(
                object,
                format!(
                    "its records end at TXID {} but its name says {}",
                    self.txid, object.max_txid
                ),
            ));
        }
        if self.checksum.map(|checksum| checksum.value()) != Some(object.post_apply) {
            return Err(BackupError::bad_object(
                object,
                "the database's checksum after it differs from its name's post-apply checksum",
            ));
        }
        Ok(())
    }

    fn apply_record<R: Read>(
        &mut self,
        object: &ObjectName,
        header: &Header,
        decoder: &mut Decoder<R>,
    ) -> Result<(), BackupError> {
        let snapshot = header.is_snapshot();
        if snapshot {
            self.page_size = header.page_size;
            self.commit = 0;
            self.checksum = Some(
                DatabaseChecksum::new(header.page_size)
                    .map_err(|error| BackupError::bad_ltx(object, error))?,
            );
        } else {
            if self.txid.0 + 1 != header.min_txid.0 {
                return Err(BackupError::bad_object(
                    object,
                    format!(
                        "record {} does not follow TXID {}",
                        header.filename(),
                        self.txid
                    ),
                ));
            }
            let current = self.checksum.map(|checksum| checksum.value());
            if current != Some(header.pre_apply_checksum) || header.page_size != self.page_size {
                return Err(BackupError::bad_object(
                    object,
                    format!(
                        "record {} expects checksum {} (page size {}) but the database has {} (page size {}): the chain is broken here",
                        header.filename(),
                        header.pre_apply_checksum,
                        header.page_size,
                        current.unwrap_or(Checksum(0)),
                        self.page_size
                    ),
                ));
            }
        }
        let checksum = self.checksum.as_mut().expect("set by the snapshot");
        let page_size = header.page_size as usize;
        // Pages up to the size before this record are in the file; their
        // checksums leave the database's as the record replaces or cuts them.
        // A snapshot's pages are summed by the decoder, which checks them
        // against its post-apply checksum.
        let before = self.commit;
        let mut replaced = vec![0u8; page_size];
        let run = &mut self.run;
        while let Some(pgno) = decoder
            .next_page_into(run.next_page(page_size))
            .map_err(|error| BackupError::bad_ltx(object, error))?
        {
            if pgno > header.commit {
                return Err(BackupError::bad_object(
                    object,
                    format!(
                        "record {} holds page {pgno}, past its database size of {} pages",
                        header.filename(),
                        header.commit
                    ),
                ));
            }
            if pgno <= before {
                let old = page_in_file(&self.file, pgno, &mut replaced)?;
                checksum.remove_page_checksum(pgno, old);
            }
            let offset = (u64::from(pgno) - 1) * page_size as u64;
            let page = run.push(offset, page_size, &self.file, &mut self.unsynced)?;
            if !snapshot {
                checksum.add_page_checksum(pgno, ltx::page_checksum(pgno, page));
            }
        }
        run.write(&self.file, &mut self.unsynced)?;
        let trailer = decoder
            .finish()
            .map_err(|error| BackupError::bad_ltx(object, error))?;
        if snapshot {
            *checksum =
                DatabaseChecksum::from_checksum(header.page_size, trailer.post_apply_checksum)
                    .map_err(|error| BackupError::bad_ltx(object, error))?;
        }
        for pgno in header.commit.saturating_add(1)..=before {
            let old = page_in_file(&self.file, pgno, &mut replaced)?;
            checksum.remove_page_checksum(pgno, old);
        }
        self.commit = header.commit;
        if checksum.value() != trailer.post_apply_checksum {
            return Err(BackupError::bad_object(
                object,
                format!(
                    "after record {} the database's checksum is {} but the record says {}",
                    header.filename(),
                    checksum.value(),
                    trailer.post_apply_checksum
                ),
            ));
        }
        self.txid = header.max_txid;
        self.timestamp_ms = header.timestamp;
        Ok(())
    }

    fn finish(self) -> Result<Restored, BackupError> {
        let bytes = u64::from(self.commit) * u64::from(self.page_size);
        self.file
            .set_len(bytes)
            .map_err(|error| BackupError::local("size the restored database", error))?;
        self.file
            .sync_all()
            .map_err(|error| BackupError::local("sync the restored database", error))?;
        Ok(Restored {
            objects: 0,
            txid: self.txid,
            timestamp_ms: self.timestamp_ms,
            checksum: self
                .checksum
                .map_or(Checksum::EMPTY_DATABASE, |checksum| checksum.value()),
            bytes,
        })
    }
}

/// The checksum of page `pgno` of the database being rebuilt in `file`, read
/// into `buffer` (one page long).
fn page_in_file(file: &File, pgno: u32, buffer: &mut [u8]) -> Result<Checksum, BackupError> {
    let offset = (u64::from(pgno) - 1) * buffer.len() as u64;
    file.read_exact_at(buffer, offset)
        .map_err(|error| BackupError::local("read back a page of the restored database", error))?;
    Ok(ltx::page_checksum(pgno, buffer))
}

/// Restores every database `destination` holds, at its newest state, into the
/// empty data dir `data_dir` (restore-on-boot), before the store opens it.
/// Returns what was restored, by database.
pub async fn restore_into_data_dir(
    destination: &Destination,
    data_dir: &Path,
    identities: Option<&Identities>,
) -> Result<Vec<(String, Restored)>, BackupError> {
    let mut names: Vec<String> = destination
        .list(None)
        .await?
        .into_iter()
        .map(|listed| listed.name.database)
        .collect();
    names.dedup();
    let seeding = crate::store::seed::Seeding::begin(data_dir)?;
    let mut restored = Vec::new();
    for name in names {
        let output = seeding.dir().join(format!(".restoring-{name}"));
        let database = restore(
            destination,
            &name,
            Target::Latest,
            &output,
            identities,
            &mut progress_log(&name),
        )
        .await?;
        seeding.add(
            &name,
            &output,
            database.txid,
            database.checksum,
            database.timestamp_ms,
        )?;
        restored.push((name, database));
    }
    seeding.finish()?;
    Ok(restored)
}

/// A progress callback that logs a restore-on-boot at each tenth of its
/// bytes, so that an operator sees what keeps a node with a large database
/// from starting.
fn progress_log(database: &str) -> impl FnMut(RestoreProgress) + Send + '_ {
    let mut logged_tenth = None;
    move |so_far| {
        let tenth = so_far.percent() / 10;
        if logged_tenth != Some(tenth) {
            logged_tenth = Some(tenth);
            tracing::info!(
                database,
                percent = so_far.percent(),
                mib = so_far.bytes >> 20,
                objects = so_far.objects,
                "restoring from the backup"
            );
        }
    }
}

/// The directory temporary files of a restore go to: beside `output`.
pub fn spool_dir_for(output: &Path) -> PathBuf {
    output
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::{PAGE_RUN_BYTES, PageRun, RestoreProgress};
    use std::os::unix::fs::FileExt;

    fn at(bytes_done: u64, bytes: u64) -> u64 {
        RestoreProgress {
            objects_done: 0,
            objects: 1,
            bytes_done,
            bytes,
        }
        .percent()
    }

    #[test]
    fn progress_is_whole_percent_of_the_planned_bytes_and_never_past_100() {
        assert_eq!(at(0, 1000), 0);
        assert_eq!(at(999, 1000), 99);
        assert_eq!(at(1000, 1000), 100);
        // A listing's size can be smaller than what arrives (an object replaced
        // meanwhile).
        assert_eq!(at(5000, 1000), 100);
        assert_eq!(at(0, 0), 100);
        assert_eq!(at(u64::MAX, u64::MAX), 100);
    }

    /// Pages pushed in any order land at their offsets, whether they continue
    /// the run, start a new one, or overflow a full one; a run kept for the
    /// next record starts empty.
    #[test]
    fn page_runs_write_every_page_at_its_offset() {
        let page_size = 4096;
        let file = tempfile::tempfile().unwrap();
        let mut unsynced = 0;
        let mut run = PageRun::default();
        let full_run = (PAGE_RUN_BYTES / page_size) as u32;
        let mut pages: Vec<u32> = (1..=full_run + 3).collect();
        pages.extend([full_run + 10, full_run + 11, full_run + 5]);
        for record in [&pages[..], &[2, 7][..]] {
            for &pgno in record {
                run.next_page(page_size).fill((pgno % 251) as u8 + 1);
                let offset = u64::from(pgno - 1) * page_size as u64;
                let page = run.push(offset, page_size, &file, &mut unsynced).unwrap();
                assert!(page.iter().all(|&byte| byte == (pgno % 251) as u8 + 1));
            }
            run.write(&file, &mut unsynced).unwrap();
            assert_eq!(run.len, 0);
        }
        for pgno in pages {
            let mut page = vec![0u8; page_size];
            file.read_exact_at(&mut page, u64::from(pgno - 1) * page_size as u64)
                .unwrap();
            assert!(
                page.iter().all(|&byte| byte == (pgno % 251) as u8 + 1),
                "page {pgno}"
            );
        }
        assert!(run.buffer.len() <= PAGE_RUN_BYTES + page_size);
    }
}
