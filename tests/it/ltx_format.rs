//! Integration tests of the LTX format module: hand-made files with known
//! bytes, golden checksums, round trips, and property tests.

use std::io::Write;

use ltxfs::ltx::{
    Checksum, DatabaseChecksum, Decoder, Encoder, FLAG_COMPRESS_LZ4, HEADER_SIZE, Header, LtxError,
    TRAILER_SIZE, Trailer, TxId, checksum_database, crc64, format_filename, lock_page_number,
    page_checksum, parse_filename, verify,
};
use proptest::prelude::*;

/// An independent CRC-64/GO-ISO straight from the `crc` crate's catalogue,
/// so the hand-made file does not rely on the module's own CRC helper.
fn reference_crc(data: &[u8]) -> u64 {
    crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO).checksum(data)
}

const FLAG: u64 = 1 << 63;

/// Page 1 of the worked example in docs/ltx.md: 512 bytes of 0x11.
fn example_page1() -> Vec<u8> {
    vec![0x11; 512]
}

/// Page 2 of the worked example: the bytes 0..=255 twice.
fn example_page2() -> Vec<u8> {
    (0..512).map(|i| (i % 256) as u8).collect()
}

/// Builds the worked example from docs/ltx.md byte by byte: a two-page
/// snapshot with page size 512, TXID 1, timestamp 1700000000000 and node ID 7.
fn hand_made_file() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"LTX1");
    f.extend_from_slice(&0u32.to_be_bytes()); // flags
    f.extend_from_slice(&512u32.to_be_bytes()); // page size
    f.extend_from_slice(&2u32.to_be_bytes()); // commit
    f.extend_from_slice(&1u64.to_be_bytes()); // min TXID
    f.extend_from_slice(&1u64.to_be_bytes()); // max TXID
    f.extend_from_slice(&1_700_000_000_000u64.to_be_bytes()); // timestamp
    f.extend_from_slice(&0u64.to_be_bytes()); // pre-apply checksum
    f.extend_from_slice(&0u64.to_be_bytes()); // WAL offset
    f.extend_from_slice(&0u64.to_be_bytes()); // WAL size
    f.extend_from_slice(&0u32.to_be_bytes()); // WAL salt 1
    f.extend_from_slice(&0u32.to_be_bytes()); // WAL salt 2
    f.extend_from_slice(&7u64.to_be_bytes()); // node ID
    f.resize(100, 0); // padding
    f.extend_from_slice(&1u32.to_be_bytes());
    f.extend_from_slice(&example_page1());
    f.extend_from_slice(&2u32.to_be_bytes());
    f.extend_from_slice(&example_page2());
    f.extend_from_slice(&0u32.to_be_bytes());
    let page_sum = |pgno: u32, page: &[u8]| {
        let mut b = pgno.to_be_bytes().to_vec();
        b.extend_from_slice(page);
        reference_crc(&b) | FLAG
    };
    let post = (page_sum(1, &example_page1()) ^ page_sum(2, &example_page2())) | FLAG;
    f.extend_from_slice(&post.to_be_bytes());
    let file_checksum = reference_crc(&f) | FLAG;
    f.extend_from_slice(&file_checksum.to_be_bytes());
    f
}

#[test]
fn crc_check_value_and_empty_database() {
    assert_eq!(crc64(b"123456789"), 0xb90956c775a41001);
    assert_eq!(reference_crc(b"123456789"), 0xb90956c775a41001);
    assert_eq!(Checksum::EMPTY_DATABASE.0, 0x8000000000000000);
    assert_eq!(
        DatabaseChecksum::new(4096).unwrap().value(),
        Checksum::EMPTY_DATABASE
    );
    assert_eq!(
        checksum_database(&[][..], 4096, 0).unwrap(),
        Checksum::EMPTY_DATABASE
    );
    assert_eq!(Checksum::EMPTY_DATABASE.to_string(), "8000000000000000");
}

#[test]
fn hand_made_file_decodes_field_by_field() {
    let bytes = hand_made_file();
    assert_eq!(bytes.len(), 1152);
    let mut dec = Decoder::new(&bytes[..]).unwrap();
    let h = *dec.header();
    assert_eq!(h.flags, 0);
    assert_eq!(h.page_size, 512);
    assert_eq!(h.commit, 2);
    assert_eq!(h.min_txid, TxId(1));
    assert_eq!(h.max_txid, TxId(1));
    assert_eq!(h.timestamp, 1_700_000_000_000);
    assert_eq!(h.pre_apply_checksum, Checksum::ZERO);
    assert_eq!(h.wal_offset, 0);
    assert_eq!(h.wal_size, 0);
    assert_eq!(h.wal_salt1, 0);
    assert_eq!(h.wal_salt2, 0);
    assert_eq!(h.node_id, 7);
    assert!(h.is_snapshot());
    assert!(!h.is_compressed());
    assert_eq!(h.encode().as_slice(), &bytes[..HEADER_SIZE]);

    assert_eq!(dec.next_page().unwrap(), Some((1, example_page1())));
    assert_eq!(dec.next_page().unwrap(), Some((2, example_page2())));
    assert_eq!(dec.next_page().unwrap(), None);
    let trailer = dec.finish().unwrap();

    // Golden values, computed independently with a bitwise CRC-64/ISO (see docs/ltx.md).
    assert_eq!(
        page_checksum(1, &example_page1()),
        Checksum(0xf1b1444fecd99000)
    );
    assert_eq!(
        page_checksum(2, &example_page2()),
        Checksum(0xc6232e56cb62cc9f)
    );
    assert_eq!(trailer.post_apply_checksum, Checksum(0xb7926a1927bb5c9f));
    assert_eq!(trailer.file_checksum, Checksum(0xf4a5890b3cd65a0f));
    assert_eq!(
        Trailer::decode(&bytes[bytes.len() - TRAILER_SIZE..]).unwrap(),
        trailer
    );

    // The database checksum of the two pages, computed three ways, agrees.
    let mut db = example_page1();
    db.extend_from_slice(&example_page2());
    assert_eq!(
        checksum_database(&db[..], 512, 2).unwrap(),
        trailer.post_apply_checksum
    );

    // The module's encoder produces the identical bytes.
    let mut out = Vec::new();
    let mut enc = Encoder::new(&mut out, h).unwrap();
    enc.encode_page(1, &example_page1()).unwrap();
    enc.encode_page(2, &example_page2()).unwrap();
    assert_eq!(enc.finish(trailer.post_apply_checksum).unwrap(), trailer);
    assert_eq!(out, bytes);
    assert_eq!(h.filename(), "0000000000000001-0000000000000001.ltx");
}

#[test]
fn hand_made_file_errors_name_the_problem() {
    let good = hand_made_file();

    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&1000u32.to_be_bytes());
    let err = verify(&bad[..]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ltx header: page size 1000 is not a power of two between 512 and 65536"
    );

    let mut bad = good.clone();
    bad[600] ^= 0x40; // Inside page 1's data.
    let err = verify(&bad[..]).unwrap_err();
    assert!(
        err.to_string().starts_with(
            "ltx file checksum mismatch: trailer says 0xf4a5890b3cd65a0f, contents give 0x"
        ),
        "{err}"
    );

    let mut bad = good.clone();
    bad.extend_from_slice(b"x");
    assert_eq!(
        verify(&bad[..]).unwrap_err().to_string(),
        "ltx file has unexpected data after the trailer at byte offset 1152"
    );

    let err = verify(&good[..1140]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ltx data truncated at byte offset 1140 while reading the 16-byte trailer"
    );
}

#[test]
fn filenames_round_trip() {
    let name = format_filename(TxId(0x10), TxId(0xabc));
    assert_eq!(name, "0000000000000010-0000000000000abc.ltx");
    assert_eq!(parse_filename(&name).unwrap(), (TxId(0x10), TxId(0xabc)));
    assert!(matches!(
        parse_filename("10-abc.ltx"),
        Err(LtxError::InvalidFilename { .. })
    ));
}

#[test]
fn round_trip_compressed_and_uncompressed_with_incremental_checksum() {
    // A snapshot followed by an incremental file, tracking the database checksum.
    for flags in [0, FLAG_COMPRESS_LZ4] {
        let page_size = 4096u32;
        let mut acc = DatabaseChecksum::new(page_size).unwrap();
        let pages: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; page_size as usize]).collect();
        for (i, p) in pages.iter().enumerate() {
            acc.add_page(i as u32 + 1, p);
        }
        let snapshot = Header {
            flags,
            page_size,
            commit: 3,
            min_txid: TxId(1),
            max_txid: TxId(1),
            timestamp: 1,
            ..Header::default()
        };
        let mut file = Vec::new();
        let mut enc = Encoder::new(&mut file, snapshot).unwrap();
        for (i, p) in pages.iter().enumerate() {
            enc.encode_page(i as u32 + 1, p).unwrap();
        }
        enc.finish(acc.value()).unwrap();
        let summary = verify(&file[..]).unwrap();
        assert_eq!(summary.trailer.post_apply_checksum, acc.value());

        // Transaction 2 rewrites page 2 and truncates page 3 away.
        let pre = acc.value();
        let new_page2 = vec![0xee; page_size as usize];
        acc.replace_page(2, &pages[1], &new_page2);
        acc.remove_page(3, &pages[2]);
        let header = Header {
            flags,
            page_size,
            commit: 2,
            min_txid: TxId(2),
            max_txid: TxId(2),
            timestamp: 2,
            pre_apply_checksum: pre,
            ..Header::default()
        };
        let mut file = Vec::new();
        let mut enc = Encoder::new(&mut file, header).unwrap();
        enc.encode_page(2, &new_page2).unwrap();
        enc.finish(acc.value()).unwrap();
        let mut dec = Decoder::new(&file[..]).unwrap();
        assert_eq!(dec.next_page().unwrap(), Some((2, new_page2.clone())));
        assert_eq!(dec.finish().unwrap().post_apply_checksum, acc.value());

        let mut db = pages[0].clone();
        db.extend_from_slice(&new_page2);
        assert_eq!(
            checksum_database(&db[..], page_size, 2).unwrap(),
            acc.value()
        );
    }
}

#[test]
fn lock_page_number_matches_pending_byte() {
    for shift in 9..=16 {
        let page_size = 1u32 << shift;
        let lock = lock_page_number(page_size);
        let start = u64::from(lock - 1) * u64::from(page_size);
        assert!(start <= 0x4000_0000 && 0x4000_0000 < start + u64::from(page_size));
    }
}

// ---------------------------------------------------------------------------
// Property tests.
// ---------------------------------------------------------------------------

/// A deterministic byte generator (xorshift64*), so that large pages do not
/// have to be produced byte by byte by proptest.
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills a page: either random bytes or a compressible pattern.
    fn page(&mut self, page_size: u32) -> Vec<u8> {
        let kind = self.next() % 3;
        let fill = self.next() as u8;
        (0..page_size)
            .map(|i| match kind {
                0 => fill,
                1 => fill.wrapping_add((i % 7) as u8),
                _ => self.next() as u8,
            })
            .collect()
    }
}

/// A random valid LTX file, described by its parts.
#[derive(Debug, Clone)]
struct FileSpec {
    header: Header,
    pages: Vec<(u32, Vec<u8>)>,
    post_apply_checksum: Checksum,
}

impl FileSpec {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out, self.header).unwrap();
        for (pgno, page) in &self.pages {
            enc.encode_page(*pgno, page).unwrap();
        }
        enc.finish(self.post_apply_checksum).unwrap();
        out
    }
}

/// Generates valid files.  `max_shift` bounds the page size (2^9 ..= 2^max_shift)
/// and `max_commit` the database size, to keep debug-build runs fast.
fn file_spec(max_shift: u32, max_commit: u32, compressed: bool) -> impl Strategy<Value = FileSpec> {
    (
        9..=max_shift,
        0..=max_commit,
        any::<bool>(),
        any::<u64>(),
        1u64..1_000_000,
        0u64..1000,
        any::<(u64, u64, u64, u32, u32, u64)>(),
    )
        .prop_map(
            move |(shift, commit, snapshot, seed, min_txid, span, misc)| {
                let page_size = 1u32 << shift;
                let mut rng = Bytes(seed | 1);
                let min_txid = if snapshot { 1 } else { min_txid.max(2) };
                let mut pages: Vec<(u32, Vec<u8>)> = Vec::new();
                for pgno in 1..=commit {
                    if snapshot || rng.next() % 2 == 0 {
                        pages.push((pgno, rng.page(page_size)));
                    }
                }
                let pre_apply_checksum = if snapshot {
                    Checksum::ZERO
                } else {
                    Checksum(rng.next() | Checksum::FLAG)
                };
                let post_apply_checksum = if snapshot {
                    let mut acc = DatabaseChecksum::new(page_size).unwrap();
                    for (pgno, page) in &pages {
                        acc.add_page(*pgno, page);
                    }
                    acc.value()
                } else {
                    Checksum(rng.next() | Checksum::FLAG)
                };
                let (timestamp, wal_offset, wal_size, wal_salt1, wal_salt2, node_id) = misc;
                FileSpec {
                    header: Header {
                        flags: if compressed { FLAG_COMPRESS_LZ4 } else { 0 },
                        page_size,
                        commit,
                        min_txid: TxId(min_txid),
                        max_txid: TxId(min_txid + span),
                        timestamp,
                        pre_apply_checksum,
                        wal_offset,
                        wal_size,
                        wal_salt1,
                        wal_salt2,
                        node_id,
                    },
                    pages,
                    post_apply_checksum,
                }
            },
        )
}

/// A decoded file: its header, its pages in order, and its trailer.
type Decoded = (Header, Vec<(u32, Vec<u8>)>, Trailer);

/// Decodes a whole file into its parts.
fn decode_all(bytes: &[u8]) -> Result<Decoded, LtxError> {
    let mut dec = Decoder::new(bytes)?;
    let mut pages = Vec::new();
    while let Some(p) = dec.next_page()? {
        pages.push(p);
    }
    let trailer = dec.finish()?;
    Ok((*dec.header(), pages, trailer))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any valid file round-trips through the encoder and decoder, compressed or not.
    #[test]
    fn prop_round_trip(
        spec in prop_oneof![file_spec(16, 2, false), file_spec(12, 6, false), file_spec(12, 6, true), file_spec(16, 2, true)]
    ) {
        let bytes = spec.encode();
        let (header, pages, trailer) = decode_all(&bytes).unwrap();
        prop_assert_eq!(header, spec.header);
        prop_assert_eq!(&pages, &spec.pages);
        prop_assert_eq!(trailer.post_apply_checksum, spec.post_apply_checksum);
        let summary = verify(&bytes[..]).unwrap();
        prop_assert_eq!(summary.page_count as usize, spec.pages.len());
        prop_assert_eq!(summary.file_size, bytes.len() as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Flipping any single byte of an uncompressed file (every offset, each
    /// XOR-ed with a pseudo-random non-zero value) makes decoding fail.
    #[test]
    fn prop_every_single_byte_flip_is_detected_uncompressed(
        spec in file_spec(10, 3, false),
        seed in any::<u64>(),
    ) {
        let bytes = spec.encode();
        let mut rng = Bytes(seed | 1);
        for offset in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[offset] ^= (rng.next() % 255 + 1) as u8;
            prop_assert!(
                decode_all(&damaged).is_err(),
                "flip at offset {} of {} went undetected", offset, bytes.len()
            );
        }
    }

    /// Flipping any single byte of a compressed file either makes decoding
    /// fail or (when the LZ4 change happens to decompress to the same bytes)
    /// yields exactly the original contents: never different data.
    #[test]
    fn prop_every_single_byte_flip_is_detected_compressed(
        spec in file_spec(10, 3, true),
        seed in any::<u64>(),
    ) {
        let bytes = spec.encode();
        let original = decode_all(&bytes).unwrap();
        let mut rng = Bytes(seed | 1);
        for offset in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[offset] ^= (rng.next() % 255 + 1) as u8;
            if let Ok(decoded) = decode_all(&damaged) {
                prop_assert_eq!(
                    &decoded, &original,
                    "flip at offset {} of {} changed the contents undetected", offset, bytes.len()
                );
            }
        }
    }

    /// Arbitrary bytes after a valid header, or a random run of bytes
    /// overwriting part of a valid file, never panic the decoder.
    #[test]
    fn prop_garbage_never_panics(
        spec in prop_oneof![file_spec(9, 2, false), file_spec(9, 2, true)],
        tail in proptest::collection::vec(any::<u8>(), 0..700),
        at in any::<prop::sample::Index>(),
    ) {
        let mut bytes = spec.header.encode().to_vec();
        bytes.extend_from_slice(&tail);
        let _ = decode_all(&bytes);

        let mut spliced = spec.encode();
        let start = at.index(spliced.len());
        for (dst, src) in spliced[start..].iter_mut().zip(&tail) {
            *dst = *src;
        }
        let result = decode_all(&spliced);
        if spliced != spec.encode() {
            prop_assert!(result.is_err() || spec.header.is_compressed());
        }
    }
}

/// One change to a modelled database.
#[derive(Debug, Clone)]
enum Op {
    /// Write page `index % (len + 1) + 1` (possibly growing the database by one page).
    Write { index: u32, seed: u64 },
    /// Truncate to `index % (len + 1)` pages.
    Truncate { index: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u32>(), any::<u64>()).prop_map(|(index, seed)| Op::Write { index, seed }),
        1 => any::<u32>().prop_map(|index| Op::Truncate { index }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The incremental database checksum equals a full recomputation after
    /// any sequence of page writes and truncations.
    #[test]
    fn prop_incremental_database_checksum(ops in proptest::collection::vec(op(), 0..40)) {
        let page_size = 512u32;
        let mut db: Vec<Vec<u8>> = Vec::new();
        let mut acc = DatabaseChecksum::new(page_size).unwrap();
        for op in ops {
            match op {
                Op::Write { index, seed } => {
                    let pgno = index % (db.len() as u32 + 1) + 1;
                    let page = Bytes(seed | 1).page(page_size);
                    match db.get_mut(pgno as usize - 1) {
                        Some(old) => {
                            acc.replace_page(pgno, old, &page);
                            *old = page;
                        }
                        None => {
                            acc.add_page(pgno, &page);
                            db.push(page);
                        }
                    }
                }
                Op::Truncate { index } => {
                    let new_len = index as usize % (db.len() + 1);
                    while db.len() > new_len {
                        let pgno = db.len() as u32;
                        let page = db.pop().unwrap();
                        acc.remove_page(pgno, &page);
                    }
                }
            }
            let flat: Vec<u8> = db.concat();
            prop_assert_eq!(
                checksum_database(&flat[..], page_size, db.len() as u32).unwrap(),
                acc.value()
            );
        }
    }
}

/// Writing through `&mut Vec` and through `Vec` gives the same bytes, and the
/// encoder accepts any `Write`.
#[test]
fn encoder_accepts_any_writer() {
    let header = Header {
        page_size: 512,
        commit: 1,
        min_txid: TxId(3),
        max_txid: TxId(3),
        pre_apply_checksum: Checksum::EMPTY_DATABASE,
        ..Header::default()
    };
    let mut a = Vec::new();
    let mut enc = Encoder::new(&mut a, header).unwrap();
    enc.encode_page(1, &[0u8; 512]).unwrap();
    enc.finish(Checksum::EMPTY_DATABASE).unwrap();
    let mut enc = Encoder::new(std::io::BufWriter::new(Vec::new()), header).unwrap();
    enc.encode_page(1, &[0u8; 512]).unwrap();
    enc.finish(Checksum::EMPTY_DATABASE).unwrap();
    let mut b = enc.into_inner().into_inner().unwrap();
    b.flush().unwrap();
    assert_eq!(a, b);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The module's CRC-64 (carry-less multiply where the CPU has it) agrees with
    /// the table-driven reference on any input, of any length and alignment,
    /// and so do page checksums.
    #[test]
    fn prop_crc64_matches_the_reference(
        data in proptest::collection::vec(any::<u8>(), 0..9000),
        skip in 0usize..16,
        pgno in 1u32..,
    ) {
        let data = &data[skip.min(data.len())..];
        prop_assert_eq!(crc64(data), reference_crc(data));
        let mut numbered = pgno.to_be_bytes().to_vec();
        numbered.extend_from_slice(data);
        prop_assert_eq!(page_checksum(pgno, data).0, reference_crc(&numbered) | FLAG);
    }
}
