//! Integration tests of applying LTX files to database files, and of the
//! file-level helpers behind `ltxfs ltx dump` and `ltxfs ltx verify`.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use ltxfs::ltx::{
    ApplyOutcome, Checksum, DatabaseChecksum, Encoder, FLAG_COMPRESS_LZ4, HEADER_SIZE, Header,
    LtxError, PAGE_HEADER_SIZE, TxId, apply, checksum_database, dump_file, format_filename,
    verify_database_checksum, verify_file,
};
use rusqlite::Connection;

/// Encodes one LTX file covering `min..=max` from `(pgno, page)` pairs.
fn encode(
    page_size: u32,
    commit: u32,
    (min, max): (u64, u64),
    pre_apply: Checksum,
    pages: &[(u32, &[u8])],
    post_apply: Checksum,
    flags: u32,
) -> Vec<u8> {
    let header = Header {
        flags,
        page_size,
        commit,
        min_txid: TxId(min),
        max_txid: TxId(max),
        timestamp: 1_700_000_000_000,
        pre_apply_checksum: pre_apply,
        node_id: 7,
        ..Header::default()
    };
    let mut out = Vec::new();
    let mut enc = Encoder::new(&mut out, header).unwrap();
    for (pgno, page) in pages {
        enc.encode_page(*pgno, page).unwrap();
    }
    enc.finish(post_apply).unwrap();
    out
}

/// A SQLite database in rollback-journal mode whose committed transactions are
/// captured as LTX files by diffing the database file before and after, the
/// way a primary's change sets are captured.
struct Primary {
    conn: Connection,
    path: PathBuf,
    page_size: u32,
    image: Vec<u8>,
    checksum: Checksum,
    txid: u64,
}

impl Primary {
    fn new(path: PathBuf) -> Primary {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode=DELETE; PRAGMA page_size=1024;")
            .unwrap();
        Primary {
            conn,
            path,
            page_size: 1024,
            image: Vec::new(),
            checksum: Checksum::EMPTY_DATABASE,
            txid: 0,
        }
    }

    /// Runs `sql` as one or more committed transactions and returns the LTX
    /// file that takes a replica from the previous capture to now, covering
    /// `txids` transactions; the first capture is a snapshot.
    fn capture(&mut self, sql: &str, txids: u64, flags: u32) -> Vec<u8> {
        self.conn.execute_batch(sql).unwrap();
        let image = std::fs::read(&self.path).unwrap();
        let ps = self.page_size as usize;
        assert_eq!(image.len() % ps, 0);
        let commit = (image.len() / ps) as u32;
        let snapshot = self.txid == 0;
        let changed: Vec<(u32, &[u8])> = image
            .chunks(ps)
            .enumerate()
            .filter(|(i, page)| snapshot || self.image.get(i * ps..(i + 1) * ps) != Some(*page))
            .map(|(i, page)| (i as u32 + 1, page))
            .collect();
        let post = checksum_database(&image[..], self.page_size, commit).unwrap();
        let pre = if snapshot {
            Checksum::ZERO
        } else {
            self.checksum
        };
        let range = (self.txid + 1, self.txid + txids);
        let ltx = encode(self.page_size, commit, range, pre, &changed, post, flags);
        self.txid += txids;
        self.image = image;
        self.checksum = post;
        ltx
    }
}

/// Returns every row of table `t`, in key order.
fn rows(conn: &Connection) -> Vec<(i64, String)> {
    let mut stmt = conn.prepare("SELECT id, v FROM t ORDER BY id").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn replaying_a_primary_from_empty_gives_an_identical_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Primary::new(dir.path().join("primary.db"));
    let replica_path = dir.path().join("replica.db");
    let replica = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&replica_path)
        .unwrap();

    let steps: Vec<(&str, u64, u32)> = vec![
        (
            "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO t(v) VALUES ('one');",
            1,
            0,
        ),
        (
            "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 400) \
             INSERT INTO t(v) SELECT printf('row %d %s', i, hex(randomblob(60))) FROM n; COMMIT;",
            1,
            FLAG_COMPRESS_LZ4,
        ),
        ("UPDATE t SET v = 'changed' WHERE id % 7 = 0;", 1, 0),
        // Two transactions coalesced into one file.
        (
            "INSERT INTO t(v) VALUES ('a'); INSERT INTO t(v) VALUES ('b');",
            2,
            FLAG_COMPRESS_LZ4,
        ),
        // Shrinks the database file.
        ("DELETE FROM t WHERE id > 50;", 1, 0),
        ("VACUUM;", 1, 0),
    ];

    let mut expected_pre = None;
    let mut shrank = false;
    let mut last_commit = 0;
    for (sql, txids, flags) in steps {
        let min = primary.txid + 1;
        let ltx = primary.capture(sql, txids, flags);
        let outcome = apply(&ltx[..], &replica, expected_pre).unwrap();
        assert_eq!(outcome.min_txid, TxId(min));
        assert_eq!(outcome.max_txid, TxId(primary.txid));
        assert_eq!(outcome.page_size, primary.page_size);
        assert_eq!(outcome.post_apply_checksum, primary.checksum);
        assert_eq!(
            std::fs::read(&replica_path).unwrap(),
            primary.image,
            "replica differs after {sql}"
        );
        verify_database_checksum(
            &replica,
            outcome.page_size,
            outcome.commit,
            outcome.post_apply_checksum,
        )
        .unwrap();
        shrank |= outcome.commit < last_commit;
        last_commit = outcome.commit;
        expected_pre = Some(outcome.post_apply_checksum);
    }
    assert!(shrank, "the history never shrank the database");

    let replica_conn = Connection::open(&replica_path).unwrap();
    assert_eq!(rows(&replica_conn), rows(&primary.conn));
    assert_eq!(rows(&replica_conn).len(), 50);
}

#[test]
fn out_of_sequence_file_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Primary::new(dir.path().join("primary.db"));
    let replica_path = dir.path().join("replica.db");
    let replica = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&replica_path)
        .unwrap();
    let snap = primary.capture("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);", 1, 0);
    let first = apply(&snap[..], &replica, None).unwrap();
    let _skipped = primary.capture("INSERT INTO t(v) VALUES ('x');", 1, 0);
    let third = primary.capture("INSERT INTO t(v) VALUES ('y');", 1, 0);
    let before = std::fs::read(&replica_path).unwrap();
    let err = apply(&third[..], &replica, Some(first.post_apply_checksum)).unwrap_err();
    assert!(
        err.to_string()
            .contains(&first.post_apply_checksum.to_string()),
        "{err}"
    );
    let after = std::fs::read(&replica_path).unwrap();
    assert_eq!(before, after);
}

/// Writes a small uncompressed file (pages 1, 2 and 3 of a 4-page database,
/// TXIDs 5..=6) under its canonical name and returns its path and bytes.
fn write_incremental(dir: &Path, flags: u32) -> (PathBuf, Vec<u8>) {
    let pages: Vec<Vec<u8>> = (1..=3u8).map(|b| vec![b; 512]).collect();
    let refs: Vec<(u32, &[u8])> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u32 + 1, &p[..]))
        .collect();
    let mut post = DatabaseChecksum::new(512).unwrap();
    post.add_page(9, &[9; 512]);
    let bytes = encode(
        512,
        4,
        (5, 6),
        Checksum(0x8000_0000_dead_beef),
        &refs,
        post.value(),
        flags,
    );
    let path = dir.join(format_filename(TxId(5), TxId(6)));
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

#[test]
fn dump_file_lists_header_fields_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = write_incremental(dir.path(), 0);
    let mut out = Vec::new();
    let summary = dump_file(&path, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    for want in [
        "  page size           512\n",
        "  commit              4\n",
        "  min txid            0000000000000005\n",
        "  max txid            0000000000000006\n",
        "  pre-apply checksum  80000000deadbeef\n",
        "  node id             0000000000000007\n",
        "  timestamp           1700000000000 (2023-11-14T22:13:20.000Z)\n",
        "  pgno 1 ",
        "  pgno 2 ",
        "  pgno 3 ",
        "(verified)",
        &format!("3 pages, {} bytes", bytes.len()),
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert_eq!(summary.page_count, 3);
    assert_eq!(summary.file_size, bytes.len() as u64);
    assert_eq!(
        summary.to_string(),
        format!(
            "ok: 0000000000000005-0000000000000006.ltx txid 5..6, 3 pages of 512 bytes, commit 4, \
             post-apply checksum {}",
            summary.trailer.post_apply_checksum
        )
    );

    // A damaged file is listed up to the damage, then the error names the offset.
    let mut bad = bytes.clone();
    let pgno3 = HEADER_SIZE + 2 * (PAGE_HEADER_SIZE + 512);
    bad[pgno3 + 3] = 1; // page number 3 becomes 1
    let bad_path = dir.path().join("bad.ltx");
    std::fs::write(&bad_path, &bad).unwrap();
    let mut out = Vec::new();
    let err = dump_file(&bad_path, &mut out).unwrap_err();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("  pgno 2 ") && !text.contains("  pgno 3 "),
        "{text}"
    );
    assert!(
        err.to_string()
            .contains(&format!("page block at byte offset {pgno3}")),
        "{err}"
    );
}

#[test]
fn verify_file_reports_truncation_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = write_incremental(dir.path(), 0);
    let summary = verify_file(&path).unwrap();
    assert!(
        summary
            .to_string()
            .starts_with("ok: 0000000000000005-0000000000000006.ltx")
    );

    // Cut in the middle of page 1's data.
    let cut = HEADER_SIZE + PAGE_HEADER_SIZE + 300;
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let err = verify_file(&path).unwrap_err();
    assert!(matches!(err, LtxError::Truncated { offset, .. } if offset == cut as u64));
    assert_eq!(
        err.to_string(),
        format!("ltx data truncated at byte offset {cut} while reading the data of page 1")
    );

    // Cut in the trailer.
    let cut = bytes.len() - 5;
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let err = verify_file(&path).unwrap_err().to_string();
    assert!(
        err.contains(&format!("byte offset {cut}")) && err.contains("trailer"),
        "{err}"
    );

    // Cut in the header.
    std::fs::write(&path, &bytes[..40]).unwrap();
    let err = verify_file(&path).unwrap_err().to_string();
    assert!(
        err.contains("byte offset 40") && err.contains("header"),
        "{err}"
    );

    // A compressed file cut short also names an offset.
    let (path, bytes) = write_incremental(dir.path(), FLAG_COMPRESS_LZ4);
    verify_file(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 30]).unwrap();
    let err = verify_file(&path).unwrap_err().to_string();
    assert!(err.contains("byte offset"), "{err}");
}

#[test]
fn verify_file_checks_canonical_names_and_reports_open_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_incremental(dir.path(), 0);

    let renamed = dir.path().join(format_filename(TxId(5), TxId(7)));
    std::fs::rename(&path, &renamed).unwrap();
    let err = verify_file(&renamed).unwrap_err();
    assert!(matches!(err, LtxError::InvalidFilename { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("0000000000000005..0000000000000006"),
        "{err}"
    );

    // Names that are not canonical are not checked.
    let other = dir.path().join("copy.ltx");
    std::fs::rename(&renamed, &other).unwrap();
    verify_file(&other).unwrap();

    let missing = dir.path().join("missing.ltx");
    let err = verify_file(&missing).unwrap_err().to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

#[test]
fn snapshot_from_file_applies_and_outcome_matches() {
    let dir = tempfile::tempdir().unwrap();
    let pages: Vec<Vec<u8>> = (1..=4u8).map(|b| vec![b; 4096]).collect();
    let refs: Vec<(u32, &[u8])> = pages
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u32 + 1, &p[..]))
        .collect();
    let mut acc = DatabaseChecksum::new(4096).unwrap();
    for (pgno, p) in &refs {
        acc.add_page(*pgno, p);
    }
    let bytes = encode(4096, 4, (1, 3), Checksum::ZERO, &refs, acc.value(), 0);
    let path = dir.path().join(format_filename(TxId(1), TxId(3)));
    std::fs::write(&path, &bytes).unwrap();
    let summary = verify_file(&path).unwrap();
    assert_eq!(
        summary.to_string(),
        format!(
            "ok: 0000000000000001-0000000000000003.ltx txid 1..3 (snapshot), 4 pages of 4096 bytes, \
             commit 4, post-apply checksum {}",
            acc.value()
        )
    );

    let db = tempfile::tempfile().unwrap();
    let outcome = apply(
        std::io::BufReader::new(File::open(&path).unwrap()),
        &db,
        None,
    )
    .unwrap();
    assert_eq!(
        outcome,
        ApplyOutcome {
            page_size: 4096,
            commit: 4,
            min_txid: TxId(1),
            max_txid: TxId(3),
            post_apply_checksum: acc.value(),
            pages_written: 4,
        }
    );
    verify_database_checksum(&db, 4096, 4, acc.value()).unwrap();
}
