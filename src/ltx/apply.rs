//! Applying LTX files to a database file.
//!
//! A replica brings its copy of a database up to date by applying the
//! primary's LTX files in transaction-ID order; tests replay a primary's
//! captured change sets onto an empty file the same way.  [`apply`] does one
//! file, and [`verify_database_checksum`] checks the result against a
//! post-apply checksum by rereading the database.
//!
//! # Invariants
//!
//! * **All or nothing with respect to bad input.**  [`apply`] decodes the whole
//!   LTX file into memory and verifies every format rule, the file checksum
//!   (and, for a snapshot, the post-apply checksum) before it writes a single
//!   byte.  A corrupt or truncated file, or (when the caller passes the
//!   expected pre-apply checksum) an out-of-sequence one, therefore leaves the
//!   database exactly as it was.
//! * **Not atomic with respect to crashes.**  Pages are written in place with
//!   positional writes and the file is then resized.  A crash or an I/O error
//!   part-way through leaves some pages new and some old, and nothing is
//!   fsynced.  Callers that need crash safety provide it themselves, for
//!   example by applying to a copy and renaming it, or by journalling the
//!   previous contents of the pages first.
//!
//! Checking that the file follows on from the database is the caller's job:
//! the caller passes the checksum it holds for the database (usually the
//! previous file's post-apply checksum) and [`apply`] compares it with the
//! file's pre-apply checksum.  [`apply`] does not know the database's page size
//! either; the caller must not apply a file with a different page size to an
//! existing database (a snapshot may change it, since it replaces everything).

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;

use super::checksum::{Checksum, checksum_database};
use super::decoder::Decoder;
use super::error::LtxError;
use super::header::{TxId, is_valid_page_size};

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The page size of the applied file.
    pub page_size: u32,
    /// The database size in pages after applying; the file is now exactly
    /// `commit * page_size` bytes long.
    pub commit: u32,
    /// The first transaction ID the file covered.
    pub min_txid: TxId,
    /// The last transaction ID the file covered.
    pub max_txid: TxId,
    /// The database checksum after applying, from the file's trailer.  It is
    /// not recomputed from the database; use [`verify_database_checksum`] for that.
    pub post_apply_checksum: Checksum,
    /// How many pages were written.
    pub pages_written: u32,
}

/// Applies one LTX file, read from `ltx`, to the database file `database`.
///
/// `ltx` must end where the LTX file ends; wrap a [`File`] in a
/// [`BufReader`].  `database` must be open for writing.
///
/// If `expected_pre_apply` is `Some` and the file is not a snapshot, the file's
/// pre-apply checksum must equal it; otherwise the file is refused with an
/// [`LtxError::InvalidHeader`] for the `"pre_apply_checksum"` field whose
/// message gives both values.  A snapshot (minimum TXID 1) has no pre-apply
/// checksum and replaces the whole database, so the check does not apply to it.
///
/// Each page is written at byte offset `(pgno - 1) * page_size`, then the file
/// is resized to `commit * page_size` bytes, which truncates it to zero when
/// the file deletes the database (commit 0).  For a snapshot that covers the
/// lock page, the lock page's bytes are also zeroed so the result does not
/// depend on what the file held before.
///
/// Nothing is fsynced, and the database checksum is not recomputed: the
/// returned [`ApplyOutcome::post_apply_checksum`] comes from the file's
/// trailer (use [`verify_database_checksum`] to check the database against it).
///
/// # Invariants
///
/// * **All or nothing with respect to bad input.**  The whole LTX file is
///   decoded into memory and every format rule, the file checksum (and, for a
///   snapshot, the post-apply checksum) and the expected pre-apply checksum are
///   checked before a single byte is written.  A corrupt, truncated or (given
///   `expected_pre_apply`) out-of-sequence file leaves the database exactly as
///   it was.  Memory use is therefore about the size of the uncompressed
///   page block.
/// * **Not atomic with respect to crashes.**  Pages are written in place and
///   the file is then resized.  A crash, or an I/O error while writing
///   ([`LtxError::Io`]), leaves some pages new and some old.  Callers that need
///   crash safety provide it themselves, for example by applying to a copy and
///   renaming it, or by saving the pages' previous contents first.
/// * The database's page size is not known here: the caller must not apply a
///   non-snapshot file whose page size differs from the database's.
pub fn apply<R: Read>(
    ltx: R,
    database: &File,
    expected_pre_apply: Option<Checksum>,
) -> Result<ApplyOutcome, LtxError> {
    let mut decoder = Decoder::new(ltx)?;
    let header = *decoder.header();
    if let Some(expected) = expected_pre_apply {
        if !header.is_snapshot() && header.pre_apply_checksum != expected {
            return Err(LtxError::InvalidHeader {
                field: "pre_apply_checksum",
                message: format!(
                    "pre-apply checksum 0x{} of {} does not match the database checksum 0x{expected}",
                    header.pre_apply_checksum,
                    header.filename()
                ),
            });
        }
    }

    // Read and verify everything before touching the database.  The pages are
    // kept back to back in one buffer, in file order (strictly increasing
    // page numbers, which the decoder enforces).
    let page_len = header.page_size as usize;
    let mut pgnos: Vec<u32> = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    loop {
        let start = data.len();
        data.resize(start + page_len, 0);
        match decoder.next_page_into(&mut data[start..])? {
            Some(pgno) => pgnos.push(pgno),
            None => {
                data.truncate(start);
                break;
            }
        }
    }
    let trailer = decoder.finish()?;

    // Write runs of consecutive pages with one call each.
    let page_size = u64::from(header.page_size);
    let mut run_start = 0usize;
    while run_start < pgnos.len() {
        let mut run_end = run_start + 1;
        while run_end < pgnos.len() && pgnos[run_end] == pgnos[run_end - 1] + 1 {
            run_end += 1;
        }
        let first = pgnos[run_start];
        let last = pgnos[run_end - 1];
        let offset = u64::from(first - 1) * page_size;
        database
            .write_all_at(&data[run_start * page_len..run_end * page_len], offset)
            .map_err(|e| {
                LtxError::io(
                    format!(
                        "writing pages {first}..={last} to the database at byte offset {offset}"
                    ),
                    e,
                )
            })?;
        run_start = run_end;
    }

    let lock_pgno = header.lock_page_number();
    if header.is_snapshot() && lock_pgno <= header.commit {
        let offset = u64::from(lock_pgno - 1) * page_size;
        database
            .write_all_at(&vec![0u8; page_len], offset)
            .map_err(|e| {
                LtxError::io(
                    format!("zeroing the lock page {lock_pgno} at byte offset {offset}"),
                    e,
                )
            })?;
    }

    let size = u64::from(header.commit) * page_size;
    database.set_len(size).map_err(|e| {
        LtxError::io(
            format!(
                "resizing the database to {size} bytes (commit {})",
                header.commit
            ),
            e,
        )
    })?;

    Ok(ApplyOutcome {
        page_size: header.page_size,
        commit: header.commit,
        min_txid: header.min_txid,
        max_txid: header.max_txid,
        post_apply_checksum: trailer.post_apply_checksum,
        pages_written: decoder.page_count(),
    })
}

/// Rereads `database` and checks that it is exactly `commit` pages of
/// `page_size` bytes whose database checksum is `expected`.
///
/// This is the slow, whole-file check behind a replica's consistency audit or
/// a test; [`apply`] itself never rereads the database.  The file is read with
/// positional reads, so its cursor does not move.  A file whose length is not
/// `commit * page_size`, or whose checksum differs, gives
/// [`LtxError::InvalidArgument`] with a message naming both values.
pub fn verify_database_checksum(
    database: &File,
    page_size: u32,
    commit: u32,
    expected: Checksum,
) -> Result<(), LtxError> {
    if !is_valid_page_size(page_size) {
        return Err(LtxError::InvalidArgument(format!(
            "page size {page_size} is not a power of two between 512 and 65536"
        )));
    }
    let len = database
        .metadata()
        .map_err(|e| LtxError::io("reading the database file's length", e))?
        .len();
    let want = u64::from(commit) * u64::from(page_size);
    if len != want {
        return Err(LtxError::InvalidArgument(format!(
            "database file is {len} bytes, but commit {commit} with page size {page_size} means {want} bytes"
        )));
    }
    let reader = BufReader::with_capacity(1 << 20, PositionalReader::new(database));
    let actual = checksum_database(reader, page_size, commit)?;
    if actual != expected {
        return Err(LtxError::InvalidArgument(format!(
            "database checksum mismatch: expected 0x{expected}, the database file gives 0x{actual}"
        )));
    }
    Ok(())
}

/// Reads a file from the start with positional reads, leaving its cursor alone.
struct PositionalReader<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> PositionalReader<'a> {
    fn new(file: &'a File) -> Self {
        PositionalReader { file, offset: 0 }
    }
}

impl Read for PositionalReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::super::checksum::DatabaseChecksum;
    use super::super::encoder::Encoder;
    use super::super::header::{FLAG_COMPRESS_LZ4, HEADER_SIZE, Header, PAGE_HEADER_SIZE};
    use super::*;

    const PS: u32 = 512;

    /// A page whose bytes depend on `seed` and on their position.
    fn page(seed: u8) -> Vec<u8> {
        (0..PS as usize)
            .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
            .collect()
    }

    /// An in-memory model of a database: its pages, 1-based.
    #[derive(Clone, Default)]
    struct Model {
        pages: Vec<Vec<u8>>,
    }

    impl Model {
        fn checksum(&self) -> Checksum {
            let mut acc = DatabaseChecksum::new(PS).unwrap();
            for (i, p) in self.pages.iter().enumerate() {
                acc.add_page(i as u32 + 1, p);
            }
            acc.value()
        }

        fn bytes(&self) -> Vec<u8> {
            self.pages.concat()
        }

        fn commit(&self) -> u32 {
            self.pages.len() as u32
        }
    }

    /// Encodes the change set that turns `before` into `after`, writing
    /// `changed` (page numbers of `after`), as transaction `txid`.
    fn change_set(
        before: &Model,
        after: &Model,
        changed: &[u32],
        txid: u64,
        flags: u32,
    ) -> Vec<u8> {
        let snapshot = txid == 1;
        let header = Header {
            flags,
            page_size: PS,
            commit: after.commit(),
            min_txid: TxId(txid),
            max_txid: TxId(txid),
            timestamp: 1_700_000_000_000 + txid,
            pre_apply_checksum: if snapshot {
                Checksum::ZERO
            } else {
                before.checksum()
            },
            ..Header::default()
        };
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out, header).unwrap();
        for &pgno in changed {
            enc.encode_page(pgno, &after.pages[pgno as usize - 1])
                .unwrap();
        }
        enc.finish(after.checksum()).unwrap();
        out
    }

    fn contents(file: &File) -> Vec<u8> {
        let mut buf = Vec::new();
        PositionalReader::new(file).read_to_end(&mut buf).unwrap();
        buf
    }

    /// A snapshot of three pages, then a change set that rewrites page 2 and
    /// grows to five pages, then one that rewrites pages 1 and 5.
    fn history() -> (Vec<Model>, Vec<Vec<u8>>) {
        let m1 = Model {
            pages: vec![page(1), page(2), page(3)],
        };
        let mut m2 = m1.clone();
        m2.pages[1] = page(20);
        m2.pages.push(page(4));
        m2.pages.push(page(5));
        let mut m3 = m2.clone();
        m3.pages[0] = page(10);
        m3.pages[4] = page(50);
        let files = vec![
            change_set(&Model::default(), &m1, &[1, 2, 3], 1, 0),
            change_set(&m1, &m2, &[2, 4, 5], 2, FLAG_COMPRESS_LZ4),
            change_set(&m2, &m3, &[1, 5], 3, 0),
        ];
        (vec![m1, m2, m3], files)
    }

    #[test]
    fn snapshot_then_incrementals() {
        let (models, files) = history();
        let db = tempfile::tempfile().unwrap();
        let mut expected = None;
        for (i, (model, ltx)) in models.iter().zip(&files).enumerate() {
            let outcome = apply(&ltx[..], &db, expected).unwrap();
            assert_eq!(
                outcome,
                ApplyOutcome {
                    page_size: PS,
                    commit: model.commit(),
                    min_txid: TxId(i as u64 + 1),
                    max_txid: TxId(i as u64 + 1),
                    post_apply_checksum: model.checksum(),
                    pages_written: [3, 3, 2][i],
                }
            );
            assert_eq!(contents(&db), model.bytes(), "after txid {}", i + 1);
            assert_eq!(
                checksum_database(&contents(&db)[..], PS, model.commit()).unwrap(),
                model.checksum()
            );
            verify_database_checksum(&db, PS, model.commit(), outcome.post_apply_checksum).unwrap();
            expected = Some(outcome.post_apply_checksum);
        }
    }

    #[test]
    fn snapshot_replaces_a_larger_file() {
        let (models, files) = history();
        let db = tempfile::tempfile().unwrap();
        db.write_all_at(&vec![0xee; 10 * PS as usize + 17], 0)
            .unwrap();
        // A snapshot ignores the expected pre-apply checksum.
        apply(&files[0][..], &db, Some(Checksum(0x8000_0000_0000_0001))).unwrap();
        assert_eq!(contents(&db), models[0].bytes());
    }

    #[test]
    fn wrong_pre_apply_checksum_is_refused() {
        let (models, files) = history();
        let db = tempfile::tempfile().unwrap();
        apply(&files[0][..], &db, None).unwrap();
        let wrong = Checksum(0x8000_0000_0000_0001);
        let err = apply(&files[1][..], &db, Some(wrong)).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                LtxError::InvalidHeader {
                    field: "pre_apply_checksum",
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains(&wrong.to_string()), "{msg}");
        assert!(msg.contains(&models[0].checksum().to_string()), "{msg}");
        assert_eq!(contents(&db), models[0].bytes());
        // Without an expectation the same file applies.
        apply(&files[1][..], &db, None).unwrap();
        assert_eq!(contents(&db), models[1].bytes());
    }

    #[test]
    fn corrupt_file_is_refused_before_any_write() {
        let (models, files) = history();
        let db = tempfile::tempfile().unwrap();
        apply(&files[0][..], &db, None).unwrap();
        // Flip a byte in the data of the last page of the third change set
        // (uncompressed), so a streaming applier would already have written
        // page 1 when it found the damage.
        let mut bad = files[2].clone();
        let last_page_data = HEADER_SIZE + (PAGE_HEADER_SIZE + PS as usize) + PAGE_HEADER_SIZE;
        bad[last_page_data + 100] ^= 0x40;
        apply(&files[1][..], &db, Some(models[0].checksum())).unwrap();
        let err = apply(&bad[..], &db, Some(models[1].checksum())).unwrap_err();
        assert!(
            matches!(err, LtxError::FileChecksumMismatch { .. }),
            "{err}"
        );
        assert_eq!(contents(&db), models[1].bytes());

        // A truncated file is refused too.
        let short = &files[2][..files[2].len() - 1];
        let err = apply(short, &db, Some(models[1].checksum())).unwrap_err();
        assert!(matches!(err, LtxError::Truncated { .. }), "{err}");
        assert_eq!(contents(&db), models[1].bytes());
    }

    #[test]
    fn commit_shrink_truncates_and_zero_empties() {
        let (models, files) = history();
        let db = tempfile::tempfile().unwrap();
        let mut post = None;
        for f in &files {
            post = Some(apply(&f[..], &db, post).unwrap().post_apply_checksum);
        }
        let m3 = &models[2];
        let mut m4 = m3.clone();
        m4.pages.truncate(2);
        m4.pages[1] = page(99);
        let shrink = change_set(m3, &m4, &[2], 4, 0);
        let outcome = apply(&shrink[..], &db, post).unwrap();
        assert_eq!(outcome.commit, 2);
        assert_eq!(db.metadata().unwrap().len(), 2 * u64::from(PS));
        assert_eq!(contents(&db), m4.bytes());
        verify_database_checksum(&db, PS, 2, m4.checksum()).unwrap();

        let m5 = Model::default();
        let delete = change_set(&m4, &m5, &[], 5, 0);
        let outcome = apply(&delete[..], &db, Some(m4.checksum())).unwrap();
        assert_eq!(outcome.commit, 0);
        assert_eq!(outcome.pages_written, 0);
        assert_eq!(outcome.post_apply_checksum, Checksum::EMPTY_DATABASE);
        assert_eq!(db.metadata().unwrap().len(), 0);
        verify_database_checksum(&db, PS, 0, Checksum::EMPTY_DATABASE).unwrap();
    }

    #[test]
    fn verify_database_checksum_names_both_values() {
        let (models, files) = history();
        let mut db = tempfile::tempfile().unwrap();
        apply(&files[0][..], &db, None).unwrap();
        db.seek(SeekFrom::Start(7)).unwrap();
        verify_database_checksum(&db, PS, 3, models[0].checksum()).unwrap();
        // Positional reads leave the cursor where it was.
        assert_eq!(db.stream_position().unwrap(), 7);

        let wrong = models[1].checksum();
        let msg = verify_database_checksum(&db, PS, 3, wrong)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(&wrong.to_string()), "{msg}");
        assert!(msg.contains(&models[0].checksum().to_string()), "{msg}");

        let msg = verify_database_checksum(&db, PS, 4, models[0].checksum())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("1536 bytes") && msg.contains("2048 bytes"),
            "{msg}"
        );

        db.seek(SeekFrom::End(0)).unwrap();
        db.write_all(&[0]).unwrap();
        assert!(verify_database_checksum(&db, PS, 3, models[0].checksum()).is_err());
        assert!(verify_database_checksum(&db, 1000, 3, models[0].checksum()).is_err());
    }
}
