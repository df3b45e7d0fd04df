//! Seeding an empty data dir with databases restored from a backup, before
//! the store opens it: each database file goes where the store keeps it, and
//! its log starts with a snapshot at the restored TXID, so the store opens
//! at that position and the history (and the backup) continues from it.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

/// Databases being restored into a data dir: they are built in a staging
/// directory beside `dbs/` and moved in together by [`Seeding::finish`], so a
/// restore that fails or is killed part-way leaves `dbs/` empty and the next
/// start restores again.
pub struct Seeding {
    /// `<data dir>/dbs.restoring`.
    staging: PathBuf,
    /// `<data dir>/dbs`.
    dbs: PathBuf,
    /// The data dir, synced after the move.
    data_dir: PathBuf,
}

impl Seeding {
    /// Starts over in a fresh staging directory of `data_dir` (what an
    /// interrupted attempt left there is removed).
    pub fn begin(data_dir: &Path) -> Result<Seeding, StoreError> {
        let staging = data_dir.join("dbs.restoring");
        match std::fs::remove_dir_all(&staging) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::io(
                    format!("remove {}", staging.display()),
                    error,
                ));
            }
            _ => {}
        }
        std::fs::create_dir_all(&staging)
            .map_err(|source| StoreError::io(format!("create {}", staging.display()), source))?;
        Ok(Seeding {
            staging,
            dbs: data_dir.join("dbs"),
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Where restored files are written before [`Seeding::add`] takes them
    /// (same filesystem, so a rename).
    pub fn dir(&self) -> &Path {
        &self.staging
    }

    /// Makes `restored` (a SQLite file in [`Seeding::dir`] whose LTX checksum
    /// is `checksum` after TXID `txid`, committed at `timestamp_ms`) database
    /// `name`, with a log holding one snapshot at that position.
    pub fn add(
        &self,
        name: &str,
        restored: &Path,
        txid: TxId,
        checksum: Checksum,
        timestamp_ms: u64,
    ) -> Result<(), StoreError> {
        seed_database(&self.staging, name, restored, txid, checksum, timestamp_ms)
    }

    /// Moves every database added into `dbs/` (which must be missing or
    /// empty), at once.
    pub fn finish(self) -> Result<(), StoreError> {
        match std::fs::remove_dir(&self.dbs) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(StoreError::io(
                    format!("remove the empty {}", self.dbs.display()),
                    error,
                ));
            }
            _ => {}
        }
        std::fs::rename(&self.staging, &self.dbs).map_err(|source| {
            StoreError::io(
                format!("move the restored databases into {}", self.dbs.display()),
                source,
            )
        })?;
        File::open(&self.data_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| StoreError::io("sync the data dir", source))
    }
}

/// Makes `restored` database `name` under `dbs_dir` (see [`Seeding::add`]).
fn seed_database(
    dbs_dir: &Path,
    name: &str,
    restored: &Path,
    txid: TxId,
    checksum: Checksum,
    timestamp_ms: u64,
) -> Result<(), StoreError> {
    let io =
        |what: &str, source| StoreError::io(format!("{what} for restored database {name}"), source);
    let dir = dbs_dir.join(name);
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
    for synced in [&dir, dbs_dir] {
        File::open(synced)
            .and_then(|handle| handle.sync_all())
            .map_err(|source| io("sync its directory", source))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small SQLite database in `dir`, and its LTX checksum.
    fn database_file(dir: &Path) -> (PathBuf, Checksum) {
        let path = dir.join("made.db");
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection
            .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(connection);
        let bytes = std::fs::read(&path).unwrap();
        let pages = (bytes.len() / 4096) as u32;
        (
            path,
            ltx::checksum_database(&bytes[..], 4096, pages).unwrap(),
        )
    }

    #[test]
    fn an_unfinished_seeding_leaves_the_data_dir_empty_and_the_next_one_starts_over() {
        let data_dir = tempfile::tempdir().unwrap();
        let seeding = Seeding::begin(data_dir.path()).unwrap();
        let (made, checksum) = database_file(seeding.dir());
        let restored = seeding.dir().join(".restoring-app.db");
        std::fs::rename(&made, &restored).unwrap();
        seeding
            .add("app.db", &restored, TxId(7), checksum, 1)
            .unwrap();
        // Killed before `finish`: nothing is in `dbs/`.
        drop(seeding);
        assert!(data_dir_is_empty(data_dir.path()).unwrap());

        let seeding = Seeding::begin(data_dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(seeding.dir()).unwrap().count(), 0);
        let (made, checksum) = database_file(seeding.dir());
        seeding.add("app.db", &made, TxId(7), checksum, 1).unwrap();
        std::fs::create_dir(data_dir.path().join("dbs")).unwrap();
        seeding.finish().unwrap();
        assert!(!data_dir_is_empty(data_dir.path()).unwrap());
        let dbs = data_dir.path().join("dbs").join("app.db");
        assert!(dbs.join("database").is_file());
        let (log, tail) = ChangeLog::open(&dbs.join("log")).unwrap();
        assert_eq!(log.records().len(), 1);
        let tail = tail.unwrap();
        assert_eq!(tail.header.max_txid, TxId(7));
        assert!(!data_dir.path().join("dbs.restoring").exists());
    }
}
