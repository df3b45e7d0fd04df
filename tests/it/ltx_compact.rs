//! Integration tests of LTX compaction (`ltxfs::ltx::compact`).
//!
//! Chains of change sets are produced by a small in-memory primary that keeps
//! the database image, writes one LTX file per transaction and tracks the
//! database checksum.  The central property is that applying the compacted
//! file gives the same bytes as applying the chain one file at a time.

use ltxfs::ltx::{
    Checksum, Decoder, Encoder, FLAG_COMPRESS_LZ4, Header, LtxError, TxId, checksum_database,
    compact, compact_onto_snapshot, verify,
};
use proptest::prelude::*;

const PS: u32 = 512;

/// Returns a page of `page_size` bytes filled with `fill`, with its page number
/// in the first four bytes so that pages never look alike by accident.
fn page(page_size: u32, pgno: u32, fill: u8) -> Vec<u8> {
    let mut p = vec![fill; page_size as usize];
    p[..4].copy_from_slice(&pgno.to_be_bytes());
    p
}

/// Applies one LTX file to a database image the way a replica does: each page
/// is written at `(pgno - 1) * page_size`, then the image is resized to
/// `commit * page_size` bytes (truncating, or extending with zeros).
fn apply(image: &mut Vec<u8>, ltx: &[u8]) {
    let mut dec = Decoder::new(ltx).unwrap();
    let header = *dec.header();
    let ps = header.page_size as usize;
    let mut pages = Vec::new();
    while let Some(p) = dec.next_page().unwrap() {
        pages.push(p);
    }
    dec.finish().unwrap();
    for (pgno, data) in pages {
        let at = (pgno as usize - 1) * ps;
        if image.len() < at + ps {
            image.resize(at + ps, 0);
        }
        image[at..at + ps].copy_from_slice(&data);
    }
    image.resize(header.commit as usize * ps, 0);
}

/// Applies every file in order to a copy of `base`.
fn apply_all(base: &[u8], files: &[Vec<u8>]) -> Vec<u8> {
    let mut image = base.to_vec();
    for f in files {
        apply(&mut image, f);
    }
    image
}

/// Compacts `files` into a new buffer.
fn compact_files(files: &[Vec<u8>], compress: bool) -> Result<(Header, Vec<u8>), LtxError> {
    let mut out = Vec::new();
    let header = compact(files.iter().map(|f| &f[..]), compress, &mut out)?;
    Ok((header, out))
}

/// Compacts `files`, whose first is a snapshot, streaming that snapshot.
fn compact_files_onto_snapshot(
    files: &[Vec<u8>],
    compress: bool,
) -> Result<(Header, Vec<u8>), LtxError> {
    let mut out = Vec::new();
    let header = compact_onto_snapshot(
        || Ok(&files[0][..]),
        files[1..].iter().map(|f| &f[..]),
        compress,
        &mut out,
    )?;
    Ok((header, out))
}

/// Decodes a file's header and trailer, checking the whole file.
fn header_and_post(ltx: &[u8]) -> (Header, Checksum) {
    let mut dec = Decoder::new(ltx).unwrap();
    let header = *dec.header();
    let trailer = dec.finish().unwrap();
    (header, trailer.post_apply_checksum)
}

/// An in-memory primary: a database image plus the LTX files of its history.
struct Primary {
    page_size: u32,
    image: Vec<u8>,
    checksum: Checksum,
    txid: u64,
    /// The LTX file of every transaction, in order.
    files: Vec<Vec<u8>>,
    /// The image after every transaction, in order.
    images: Vec<Vec<u8>>,
    /// Whether the files it writes are LZ4-compressed.
    compress: bool,
}

impl Primary {
    fn new(page_size: u32, compress: bool) -> Primary {
        Primary {
            page_size,
            image: Vec::new(),
            checksum: Checksum::EMPTY_DATABASE,
            txid: 0,
            files: Vec::new(),
            images: Vec::new(),
            compress,
        }
    }

    fn commit_size(&self) -> u32 {
        (self.image.len() / self.page_size as usize) as u32
    }

    /// Commits one transaction that writes `writes` (page number and fill
    /// byte; every page number at most `commit`) and leaves the database
    /// `commit` pages long.  The first transaction is a snapshot, so it must
    /// write every page.
    fn commit(&mut self, writes: &[(u32, u8)], commit: u32) -> &[u8] {
        let mut writes: Vec<(u32, Vec<u8>)> = writes
            .iter()
            .map(|&(pgno, fill)| (pgno, page(self.page_size, pgno, fill)))
            .collect();
        writes.sort_by_key(|(pgno, _)| *pgno);
        writes.dedup_by_key(|(pgno, _)| *pgno);
        self.txid += 1;
        let (min, pre) = if self.txid == 1 {
            (1, Checksum::ZERO)
        } else {
            (self.txid, self.checksum)
        };
        self.write_file(min, pre, &writes, commit)
    }

    /// Commits a snapshot (minimum TXID 1) that replaces the database with
    /// `commit` pages of `page_size` bytes filled with `fill`.
    fn snapshot(&mut self, page_size: u32, commit: u32, fill: u8) -> &[u8] {
        self.page_size = page_size;
        self.image.clear();
        let writes: Vec<(u32, Vec<u8>)> = (1..=commit)
            .map(|pgno| (pgno, page(page_size, pgno, fill)))
            .collect();
        self.txid += 1;
        self.write_file(1, Checksum::ZERO, &writes, commit)
    }

    fn write_file(
        &mut self,
        min: u64,
        pre: Checksum,
        writes: &[(u32, Vec<u8>)],
        commit: u32,
    ) -> &[u8] {
        let ps = self.page_size as usize;
        for (pgno, data) in writes {
            let at = (*pgno as usize - 1) * ps;
            if self.image.len() < at + ps {
                self.image.resize(at + ps, 0);
            }
            self.image[at..at + ps].copy_from_slice(data);
        }
        self.image.resize(commit as usize * ps, 0);
        self.checksum = checksum_database(&self.image[..], self.page_size, commit).unwrap();
        let header = Header {
            flags: if self.compress { FLAG_COMPRESS_LZ4 } else { 0 },
            page_size: self.page_size,
            commit,
            min_txid: TxId(min),
            max_txid: TxId(self.txid),
            timestamp: 1_700_000_000_000 + self.txid,
            pre_apply_checksum: pre,
            wal_offset: 4096 * self.txid,
            wal_size: 4096,
            wal_salt1: 11,
            wal_salt2: 22,
            node_id: 100 + self.txid,
        };
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out, header).unwrap();
        for (pgno, data) in writes {
            enc.encode_page(*pgno, data).unwrap();
        }
        enc.finish(self.checksum).unwrap();
        self.files.push(out);
        self.images.push(self.image.clone());
        self.files.last().unwrap()
    }
}

/// The chain of the task: a snapshot of 3 pages, a change to page 2, growth
/// to 5 pages, and a shrink to 4 pages.
fn scenario(compress: bool) -> Primary {
    let mut p = Primary::new(PS, compress);
    p.commit(&[(1, 0x10), (2, 0x20), (3, 0x30)], 3);
    p.commit(&[(2, 0x21)], 3);
    p.commit(&[(1, 0x11), (4, 0x40), (5, 0x50)], 5);
    p.commit(&[(1, 0x12)], 4);
    p
}

/// Returns the page numbers a file contains.
fn page_numbers(ltx: &[u8]) -> Vec<u32> {
    let mut dec = Decoder::new(ltx).unwrap();
    let mut pgnos = Vec::new();
    while let Some((pgno, _)) = dec.next_page().unwrap() {
        pgnos.push(pgno);
    }
    dec.finish().unwrap();
    pgnos
}

#[test]
fn whole_chain_compacts_to_an_equivalent_snapshot() {
    for (inputs_compressed, compress) in
        [(false, false), (false, true), (true, false), (true, true)]
    {
        let p = scenario(inputs_compressed);
        let (header, out) = compact_files(&p.files, compress).unwrap();
        verify(&out[..]).unwrap();

        // Applying the compacted file to an empty database gives the same
        // bytes as applying the chain.
        assert_eq!(apply_all(&[], &p.files), p.image);
        assert_eq!(apply_all(&[], std::slice::from_ref(&out)), p.image);

        let (last, last_post) = header_and_post(p.files.last().unwrap());
        let (decoded, post) = header_and_post(&out);
        assert_eq!(decoded, header);
        assert_eq!(
            header,
            Header {
                flags: if compress { FLAG_COMPRESS_LZ4 } else { 0 },
                page_size: PS,
                commit: 4,
                min_txid: TxId(1),
                max_txid: TxId(4),
                timestamp: last.timestamp,
                pre_apply_checksum: Checksum::ZERO,
                wal_offset: 0,
                wal_size: 0,
                wal_salt1: 0,
                wal_salt2: 0,
                node_id: last.node_id,
            }
        );
        assert!(header.is_snapshot());
        assert_eq!(post, last_post);
        assert_eq!(post, p.checksum);
        // Page 5 was dropped when the database shrank.
        assert_eq!(page_numbers(&out), [1, 2, 3, 4]);
    }
}

#[test]
fn middle_range_compacts_with_the_first_pre_apply_checksum() {
    let p = scenario(false);
    for (start, end) in [(1, 4), (1, 3), (2, 4), (1, 2), (2, 3)] {
        let range = &p.files[start..end];
        let (header, out) = compact_files(range, true).unwrap();
        let (first, _) = header_and_post(&range[0]);
        let (last, last_post) = header_and_post(&range[range.len() - 1]);
        assert_eq!(header.min_txid, first.min_txid);
        assert_eq!(header.max_txid, last.max_txid);
        assert_eq!(header.pre_apply_checksum, first.pre_apply_checksum);
        assert_eq!(header.commit, last.commit);
        assert_eq!(header.timestamp, last.timestamp);
        assert_eq!(header.node_id, last.node_id);
        assert_eq!(
            (
                header.wal_offset,
                header.wal_size,
                header.wal_salt1,
                header.wal_salt2
            ),
            (0, 0, 0, 0)
        );
        assert!(!header.is_snapshot());
        assert_eq!(header_and_post(&out).1, last_post);

        let base = &p.images[start - 1];
        assert_eq!(
            apply_all(base, std::slice::from_ref(&out)),
            p.images[end - 1],
            "range {start}..{end}"
        );
    }

    // Only the pages the range touched are stored: 1, 2 (from the change), 4 and 5 (growth),
    // minus 5, which the shrink dropped.
    let (_, out) = compact_files(&p.files[1..], false).unwrap();
    assert_eq!(page_numbers(&out), [1, 2, 4]);
}

#[test]
fn single_file_compacts_to_the_same_pages() {
    let p = scenario(false);
    for (i, file) in p.files.iter().enumerate() {
        let (header, out) = compact_files(std::slice::from_ref(file), false).unwrap();
        let (orig, post) = header_and_post(file);
        assert_eq!(page_numbers(&out), page_numbers(file));
        assert_eq!(header_and_post(&out).1, post);
        assert_eq!(
            header,
            Header {
                wal_offset: 0,
                wal_size: 0,
                wal_salt1: 0,
                wal_salt2: 0,
                ..orig
            }
        );
        let base = if i == 0 {
            &[][..]
        } else {
            &p.images[i - 1][..]
        };
        assert_eq!(apply_all(base, std::slice::from_ref(&out)), p.images[i]);
    }
}

#[test]
fn gap_in_txids_is_refused_naming_both_files() {
    let p = scenario(false);
    let chain = [p.files[0].clone(), p.files[2].clone()];
    let mut out = Vec::new();
    let err = compact(chain.iter().map(|f| &f[..]), false, &mut out).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            LtxError::InvalidHeader {
                field: "min_txid",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(msg.contains("0000000000000001-0000000000000001"), "{msg}");
    assert!(msg.contains("0000000000000003-0000000000000003"), "{msg}");
    assert!(out.is_empty(), "nothing is written for a broken chain");
}

#[test]
fn checksum_mismatch_is_refused_naming_both_files() {
    let p = scenario(false);
    // A second transaction that claims to follow a different database.
    let mut other = Primary::new(PS, false);
    other.commit(&[(1, 0x99), (2, 0x99), (3, 0x99)], 3);
    other.commit(&[(2, 0x21)], 3);
    let chain = [p.files[0].clone(), other.files[1].clone()];
    let err = compact_files(&chain, false).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            LtxError::InvalidHeader {
                field: "pre_apply_checksum",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(msg.contains("0000000000000001-0000000000000001"), "{msg}");
    assert!(msg.contains("0000000000000002-0000000000000002"), "{msg}");
    let first_post = header_and_post(&p.files[0]).1;
    assert!(msg.contains(&format!("0x{first_post}")), "{msg}");
}

#[test]
fn out_of_order_and_page_size_changes_are_refused() {
    let p = scenario(false);
    // Files in the wrong order.
    let chain = [p.files[2].clone(), p.files[1].clone()];
    let err = compact_files(&chain, false).unwrap_err();
    assert!(
        matches!(
            err,
            LtxError::InvalidHeader {
                field: "min_txid",
                ..
            }
        ),
        "{err:?}"
    );
    // A snapshot that does not move the log forward.
    let chain = [p.files[1].clone(), p.files[0].clone()];
    let err = compact_files(&chain, false).unwrap_err();
    assert!(
        matches!(
            err,
            LtxError::InvalidHeader {
                field: "max_txid",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("0000000000000002-0000000000000002"),
        "{err}"
    );

    // A non-snapshot that changes the page size replaces everything before
    // it when it holds every page (as capture writes it after a VACUUM that
    // changes the page size), and is refused when it does not.
    let mut a = Primary::new(PS, false);
    a.commit(&[(1, 1)], 1);
    let mut whole = Primary::new(2 * PS, false);
    whole.commit(&[(1, 1), (2, 1)], 2);
    whole.checksum = a.checksum;
    whole.commit(&[(1, 2), (2, 2)], 2);
    let chain = [a.files[0].clone(), whole.files[1].clone()];
    let (header, out) = compact_files(&chain, false).unwrap();
    assert_eq!((header.page_size, header.commit), (2 * PS, 2));
    assert_eq!(apply_all(&[], &[out]), whole.images[1]);
    let (_, out) = compact_files_onto_snapshot(&chain, false).unwrap();
    assert_eq!(apply_all(&[], &[out]), whole.images[1]);
    let mut b = Primary::new(2 * PS, false);
    b.commit(&[(1, 1), (2, 1)], 2);
    b.checksum = a.checksum;
    b.commit(&[(1, 2)], 2);
    let chain = [a.files[0].clone(), b.files[1].clone()];
    let err = compact_files(&chain, false).unwrap_err();
    assert!(
        matches!(
            err,
            LtxError::InvalidHeader {
                field: "page_size",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn corrupt_input_is_refused_before_anything_is_written() {
    let p = scenario(false);
    let mut files = p.files.clone();
    let len = files[2].len();
    files[2][len / 2] ^= 0x55;
    let mut out = Vec::new();
    let err = compact(files.iter().map(|f| &f[..]), true, &mut out).unwrap_err();
    assert!(
        matches!(err, LtxError::FileChecksumMismatch { .. }),
        "{err:?}"
    );
    assert!(out.is_empty());

    // A truncated input names the input.
    let mut files = p.files.clone();
    let len = files[3].len();
    files[3].truncate(len - 1);
    let err = compact_files(&files, false).unwrap_err();
    assert!(
        err.to_string()
            .contains("compaction input 4 (TXIDs 0000000000000004-0000000000000004)"),
        "{err}"
    );

    let err = compact(std::iter::empty::<&[u8]>(), false, Vec::new()).unwrap_err();
    assert!(matches!(err, LtxError::InvalidArgument(_)), "{err:?}");
}

#[test]
fn snapshot_in_the_middle_replaces_everything_before_it() {
    let mut p = Primary::new(PS, false);
    p.commit(&[(1, 1), (2, 2), (3, 3), (4, 4)], 4);
    p.commit(&[(4, 5)], 4);
    // The snapshot doubles the page size and shrinks the database.
    p.snapshot(2 * PS, 2, 7);
    p.commit(&[(3, 8)], 3);
    p.commit(&[(1, 9)], 3);

    let (header, out) = compact_files(&p.files[1..], false).unwrap();
    assert_eq!(header.min_txid, TxId(2));
    assert_eq!(header.max_txid, TxId(5));
    assert_eq!(header.page_size, 2 * PS);
    assert_eq!(header.commit, 3);
    assert_eq!(
        header.pre_apply_checksum,
        header_and_post(&p.files[1]).0.pre_apply_checksum
    );
    // Everything from the snapshot on is stored, and nothing from before it.
    assert_eq!(page_numbers(&out), [1, 2, 3]);
    assert_eq!(apply_all(&p.images[0], std::slice::from_ref(&out)), p.image);
    assert_eq!(header_and_post(&out).1, p.checksum);

    let (header, out) = compact_files(&p.files, true).unwrap();
    assert!(header.is_snapshot());
    assert_eq!(apply_all(&[], std::slice::from_ref(&out)), p.image);

    // A compacted run may also end with the snapshot.
    let (header, out) = compact_files(&p.files[..3], false).unwrap();
    assert_eq!(header.max_txid, TxId(3));
    assert_eq!(
        apply_all(&p.images[0], std::slice::from_ref(&out)),
        p.images[2]
    );
}

#[test]
fn pages_truncated_away_and_not_rewritten_come_back_as_zeros() {
    let mut p = Primary::new(PS, false);
    p.commit(&[(1, 1), (2, 2), (3, 3), (4, 4)], 4);
    p.commit(&[(1, 5)], 2);
    // Growing back to 4 pages but writing only page 4 leaves page 3 zeroed.
    p.commit(&[(4, 6)], 4);
    assert!(
        p.image[2 * PS as usize..3 * PS as usize]
            .iter()
            .all(|&b| b == 0)
    );

    let (_, out) = compact_files(&p.files[1..], false).unwrap();
    assert_eq!(page_numbers(&out), [1, 3, 4]);
    assert_eq!(apply_all(&p.images[0], std::slice::from_ref(&out)), p.image);

    let (_, out) = compact_files(&p.files, false).unwrap();
    assert_eq!(apply_all(&[], std::slice::from_ref(&out)), p.image);

    // Deleting the database and growing it again behaves the same way.
    p.commit(&[], 0);
    p.commit(&[(2, 7)], 3);
    let (header, out) = compact_files(&p.files[1..], false).unwrap();
    assert_eq!(header.commit, 3);
    assert_eq!(page_numbers(&out), [1, 2, 3]);
    assert_eq!(apply_all(&p.images[0], std::slice::from_ref(&out)), p.image);
}

/// One generated transaction.
#[derive(Debug, Clone)]
enum Tx {
    /// Page writes (page number, fill byte), then the database size, or
    /// `None` to keep the size (growing it to the highest page written).
    Change {
        writes: Vec<(u32, u8)>,
        commit: Option<u32>,
    },
    /// A snapshot replacing the database: page size, page count and fill byte.
    Snapshot {
        page_size: u32,
        commit: u32,
        fill: u8,
    },
}

fn tx(max_pages: u32) -> impl Strategy<Value = Tx> {
    let change = (
        proptest::collection::vec((1..=max_pages, any::<u8>()), 0..6),
        prop_oneof![2 => Just(None), 1 => (0..=max_pages).prop_map(Some)],
    )
        .prop_map(|(writes, commit)| Tx::Change { writes, commit });
    let snapshot = (
        prop_oneof![Just(PS), Just(2 * PS)],
        0..=max_pages,
        any::<u8>(),
    )
        .prop_map(|(page_size, commit, fill)| Tx::Snapshot {
            page_size,
            commit,
            fill,
        });
    prop_oneof![8 => change, 1 => snapshot]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random chains compact to the same bytes as sequential application, for
    /// the whole chain and for any sub-range applied to the right base.
    #[test]
    fn prop_compaction_matches_sequential_application(
        initial in 0..=8u32,
        txs in proptest::collection::vec(tx(10), 1..10),
        inputs_compressed in any::<bool>(),
        compress in any::<bool>(),
        range in (any::<prop::sample::Index>(), any::<prop::sample::Index>()),
    ) {
        let mut p = Primary::new(PS, inputs_compressed);
        let snapshot: Vec<(u32, u8)> = (1..=initial).map(|pgno| (pgno, pgno as u8)).collect();
        p.commit(&snapshot, initial);
        for t in &txs {
            match t {
                Tx::Change { writes, commit } => {
                    let commit = commit.unwrap_or_else(|| {
                        p.commit_size().max(writes.iter().map(|w| w.0).max().unwrap_or(0))
                    });
                    let writes: Vec<(u32, u8)> =
                        writes.iter().copied().filter(|w| w.0 <= commit).collect();
                    p.commit(&writes, commit);
                }
                Tx::Snapshot { page_size, commit, fill } => {
                    p.snapshot(*page_size, *commit, *fill);
                }
            }
        }

        let (header, out) = compact_files(&p.files, compress).unwrap();
        prop_assert!(header.is_snapshot());
        prop_assert_eq!(header.commit, p.commit_size());
        prop_assert_eq!(header_and_post(&out).1, p.checksum);
        prop_assert_eq!(apply_all(&[], std::slice::from_ref(&out)), p.image.clone());

        let n = p.files.len();
        let (a, b) = (range.0.index(n), range.1.index(n));
        let (start, end) = (a.min(b), a.max(b) + 1);

        // Streaming the first snapshot instead of holding it gives the same file,
        // for the whole chain and for every run that starts with it.
        prop_assert_eq!(
            compact_files_onto_snapshot(&p.files[..end], compress).unwrap(),
            compact_files(&p.files[..end], compress).unwrap()
        );
        let (header, out) = compact_files(&p.files[start..end], compress).unwrap();
        let (first, _) = header_and_post(&p.files[start]);
        prop_assert_eq!(header.min_txid, first.min_txid);
        prop_assert_eq!(header.max_txid, TxId(end as u64));
        prop_assert_eq!(header.pre_apply_checksum, first.pre_apply_checksum);
        let (last, last_post) = header_and_post(&p.files[end - 1]);
        prop_assert_eq!(header.page_size, last.page_size);
        prop_assert_eq!(header.commit, last.commit);
        prop_assert_eq!(header_and_post(&out).1, last_post);
        let base: &[u8] = if start == 0 { &[] } else { &p.images[start - 1] };
        prop_assert_eq!(
            apply_all(base, std::slice::from_ref(&out)),
            p.images[end - 1].clone()
        );
    }
}

#[test]
fn compacting_onto_a_snapshot_refuses_a_first_input_that_is_not_one() {
    let mut p = Primary::new(PS, false);
    p.commit(&[(1, 1)], 1);
    p.commit(&[(1, 2)], 1);
    let error = compact_files_onto_snapshot(&p.files[1..], false).unwrap_err();
    assert!(
        matches!(error, LtxError::InvalidArgument(ref message) if message.contains("needs a snapshot first")),
        "{error:?}"
    );
}

#[test]
fn compacting_onto_a_snapshot_that_reads_differently_the_second_time_fails() {
    let mut p = Primary::new(PS, false);
    p.commit(&[(1, 1), (2, 2), (3, 3)], 3);
    p.commit(&[(2, 9)], 3);
    let other = {
        let mut q = Primary::new(PS, false);
        q.commit(&[(1, 1), (2, 2)], 2);
        q.files[0].clone()
    };
    let mut opened = 0;
    let mut out = Vec::new();
    let error = compact_onto_snapshot(
        || {
            opened += 1;
            Ok(if opened == 1 {
                &p.files[0][..]
            } else {
                &other[..]
            })
        },
        [&p.files[1][..]],
        false,
        &mut out,
    )
    .unwrap_err();
    assert!(
        matches!(error, LtxError::InvalidArgument(_)),
        "the snapshot changed between its two readings: {error:?}"
    );
}
