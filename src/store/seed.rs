//! Seeding an empty data dir with databases restored from a backup, before
//! the store opens it: each database file goes where the store keeps it, and
//! its log starts with a snapshot at the restored TXID, so the store opens
//! at that position and the history (and the backup) continues from it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::StoreError;
use super::log::{ChangeLog, LtxBytes};
use super::names::FileKind;
use crate::ltx::{self, Checksum, Encoder, Header, TxId};

/// Whether `data_dir` holds no database yet.
pub fn data_dir_is_empty(data_dir: &Path) -> Result<bool, StoreError> {
    match std::fs::read_dir(data_dir.join("dbs")) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(StoreError::io("list the data dir's databases", source)),
    }
}

/// The directory a restored database's file is written in before
/// [`seed_database`] moves it into place (same filesystem, so a rename).
pub fn seed_dir(data_dir: &Path) -> Result<std::path::PathBuf, StoreError> {
    let dir = data_dir.join("dbs");
    std::fs::create_dir_all(&dir)
        .map_err(|source| StoreError::io(format!("create {}", dir.display()), source))?;
    Ok(dir)
}

/// Makes `restored` (a SQLite file in [`seed_dir`] whose LTX checksum is
/// `checksum` after TXID `txid`, committed at `timestamp_ms`) database `name`
/// of `data_dir`, with a log holding one snapshot at that position.
pub fn seed_database(
    data_dir: &Path,
    name: &str,
    restored: &Path,
    txid: TxId,
    checksum: Checksum,
    timestamp_ms: u64,
) -> Result<(), StoreError> {
    let io =
        |what: &str, source| StoreError::io(format!("{what} for restored database {name}"), source);
    let dir = data_dir.join("dbs").join(name);
    std::fs::create_dir(&dir).map_err(|source| io("create its directory", source))?;
    let database = dir.join(FileKind::Database.backing_name());
    std::fs::rename(restored, &database).map_err(|source| io("move it into place", source))?;
    let file = File::open(&database).map_err(|source| io("open it", source))?;
    let mut first = [0u8; 100];
    file.read_exact_at(&mut first, 0)
        .map_err(|source| io("read its header", source))?;
    let page_size = match u16::from_be_bytes([first[16], first[17]]) {
        1 => 65536,
        size => u32::from(size),
    };
    let length = file
        .metadata()
        .map_err(|source| io("stat it", source))?
        .len();
    let commit = u32::try_from(length / u64::from(page_size)).map_err(|_| {
        io(
            "count its pages",
            std::io::Error::other("more pages than SQLite allows"),
        )
    })?;
    let capture_error = |error: ltx::LtxError| StoreError::Capture {
        database: name.to_string(),
        message: format!("could not write the restored snapshot: {error}"),
    };
    let mut spool = tempfile::tempfile_in(&dir).map_err(|source| io("spool a snapshot", source))?;
    let header = Header {
        flags: ltx::FLAG_COMPRESS_LZ4,
        page_size,
        commit,
        min_txid: TxId(1),
        max_txid: txid,
        timestamp: timestamp_ms,
        pre_apply_checksum: Checksum(0),
        ..Header::default()
    };
    let mut encoder = Encoder::new(BufWriter::new(&mut spool), header).map_err(capture_error)?;
    let mut reader = BufReader::new(&file);
    let lock_page = ltx::lock_page_number(page_size);
    let mut page = vec![0u8; page_size as usize];
    for pgno in 1..=commit {
        reader
            .read_exact(&mut page)
            .map_err(|source| io("read a page", source))?;
        if pgno != lock_page {
            encoder.encode_page(pgno, &page).map_err(capture_error)?;
        }
    }
    encoder.finish(checksum).map_err(capture_error)?;
    encoder
        .into_inner()
        .into_inner()
        .map_err(|error| io("write the snapshot", error.into_error()))?;
    let len = spool
        .seek(SeekFrom::End(0))
        .map_err(|source| io("size the snapshot", source))?;
    let (mut log, _) = ChangeLog::open(&dir.join("log"))?;
    log.append(
        header,
        LtxBytes::File {
            file: &spool,
            offset: 0,
            len,
        },
    )?;
    log.sync()?;
    for synced in [&dir, &data_dir.join("dbs")] {
        File::open(synced)
            .and_then(|handle| handle.sync_all())
            .map_err(|source| io("sync its directory", source))?;
    }
    Ok(())
}
