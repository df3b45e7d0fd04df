//! Unit tests of the encoder, decoder and whole-file helpers working together.

use super::*;

/// Returns a page filled with `byte`.
fn page(page_size: u32, byte: u8) -> Vec<u8> {
    vec![byte; page_size as usize]
}

/// A valid non-snapshot header.
fn incremental_header(page_size: u32, commit: u32, flags: u32) -> Header {
    Header {
        flags,
        page_size,
        commit,
        min_txid: TxId(5),
        max_txid: TxId(6),
        timestamp: 1_700_000_000_000,
        pre_apply_checksum: Checksum(0x8000_0000_dead_beef),
        ..Header::default()
    }
}

/// A valid snapshot header.
fn snapshot_header(page_size: u32, commit: u32, flags: u32) -> Header {
    Header {
        min_txid: TxId(1),
        pre_apply_checksum: Checksum::ZERO,
        ..incremental_header(page_size, commit, flags)
    }
}

/// Encodes a file with the real encoder.
fn encode(header: Header, pages: &[(u32, Vec<u8>)], post: Checksum) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = Encoder::new(&mut out, header).unwrap();
    for (pgno, data) in pages {
        enc.encode_page(*pgno, data).unwrap();
    }
    enc.finish(post).unwrap();
    out
}

/// Builds an uncompressed file byte by byte, with a correct file checksum,
/// without going through any validation, so that invalid files can be made.
fn raw_file(header: &[u8; HEADER_SIZE], records: &[(u32, &[u8])], post: Checksum) -> Vec<u8> {
    let mut out = header.to_vec();
    for (pgno, data) in records {
        out.extend_from_slice(&pgno.to_be_bytes());
        out.extend_from_slice(data);
    }
    out.extend_from_slice(&0u32.to_be_bytes());
    out.extend_from_slice(&post.0.to_be_bytes());
    let file_checksum = crc64(&out) | Checksum::FLAG;
    out.extend_from_slice(&file_checksum.to_be_bytes());
    out
}

/// A decoded file: its header, its pages in order, and its trailer.
type Decoded = (Header, Vec<(u32, Vec<u8>)>, Trailer);

/// Decodes a whole file, returning the pages and trailer.
fn decode(bytes: &[u8]) -> Result<Decoded, LtxError> {
    let mut dec = Decoder::new(bytes)?;
    let mut pages = Vec::new();
    while let Some(p) = dec.next_page()? {
        pages.push(p);
    }
    let trailer = dec.finish()?;
    Ok((*dec.header(), pages, trailer))
}

/// Returns the database checksum of `pages` as if they were the whole database.
fn db_checksum(page_size: u32, pages: &[(u32, Vec<u8>)]) -> Checksum {
    let mut acc = DatabaseChecksum::new(page_size).unwrap();
    for (pgno, data) in pages {
        acc.add_page(*pgno, data);
    }
    acc.value()
}

#[test]
fn round_trip_uncompressed_and_compressed() {
    for flags in [0, FLAG_COMPRESS_LZ4] {
        let header = incremental_header(1024, 9, flags);
        let pages = vec![(2, page(1024, 1)), (3, page(1024, 2)), (9, page(1024, 3))];
        let post = Checksum(0x8000_0000_0000_1234);
        let bytes = encode(header, &pages, post);
        let (h, got, trailer) = decode(&bytes).unwrap();
        assert_eq!(h, header);
        assert_eq!(got, pages);
        assert_eq!(trailer.post_apply_checksum, post);
        let summary = verify(&bytes[..]).unwrap();
        assert_eq!(summary.page_count, 3);
        assert_eq!(summary.file_size, bytes.len() as u64);
        assert_eq!(summary.trailer, trailer);
    }
}

#[test]
fn compressed_file_is_smaller_and_has_same_file_checksum() {
    let pages: Vec<_> = (1..=4).map(|p| (p, page(4096, p as u8))).collect();
    let post = db_checksum(4096, &pages);
    let plain = encode(snapshot_header(4096, 4, 0), &pages, post);
    let packed = encode(snapshot_header(4096, 4, FLAG_COMPRESS_LZ4), &pages, post);
    assert!(
        packed.len() < plain.len() / 4,
        "{} vs {}",
        packed.len(),
        plain.len()
    );
    // The header differs only in the flags, so the checksums differ, but each verifies.
    verify(&plain[..]).unwrap();
    verify(&packed[..]).unwrap();
}

#[test]
fn empty_snapshot_of_deleted_database() {
    let header = snapshot_header(512, 0, 0);
    let bytes = encode(header, &[], Checksum::EMPTY_DATABASE);
    assert_eq!(bytes.len(), HEADER_SIZE + 4 + TRAILER_SIZE);
    let (_, pages, trailer) = decode(&bytes).unwrap();
    assert!(pages.is_empty());
    assert_eq!(trailer.post_apply_checksum, Checksum::EMPTY_DATABASE);
}

#[test]
fn encoder_enforces_rules() {
    let header = incremental_header(512, 10, 0);
    let mut out = Vec::new();
    let mut enc = Encoder::new(&mut out, header).unwrap();
    let err = enc.encode_page(1, &page(1024, 0)).unwrap_err();
    assert!(
        err.to_string()
            .contains("page 1 has 1024 bytes, but the page size is 512"),
        "{err}"
    );
    enc.encode_page(7, &page(512, 0)).unwrap();
    let err = enc.encode_page(3, &page(512, 0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "page block at byte offset 616: page number 3 is not greater than previous page 7"
    );
    assert!(enc.encode_page(0, &page(512, 0)).is_err());
    assert!(
        enc.encode_page(11, &page(512, 0))
            .unwrap_err()
            .to_string()
            .contains("beyond")
    );
    // Rule violations leave the encoder usable.
    enc.encode_page(8, &page(512, 0)).unwrap();
    assert!(
        enc.finish(Checksum(5))
            .unwrap_err()
            .to_string()
            .contains("bit 63")
    );
    enc.finish(Checksum::EMPTY_DATABASE).unwrap();
    assert!(enc.encode_page(9, &page(512, 0)).is_err());
    assert!(enc.finish(Checksum::EMPTY_DATABASE).is_err());
    assert_eq!(enc.page_count(), 2);
    drop(enc);
    verify(&out[..]).unwrap();

    let bad = Header {
        page_size: 1000,
        ..header
    };
    assert!(Encoder::new(Vec::new(), bad).is_err());
}

#[test]
fn encoder_enforces_snapshot_rules() {
    let header = snapshot_header(512, 3, 0);
    let mut enc = Encoder::new(Vec::new(), header).unwrap();
    enc.encode_page(1, &page(512, 1)).unwrap();
    let err = enc.encode_page(3, &page(512, 3)).unwrap_err();
    assert!(
        err.to_string().contains("snapshot is missing page 2"),
        "{err}"
    );
    enc.encode_page(2, &page(512, 2)).unwrap();
    let err = enc.finish(Checksum::EMPTY_DATABASE).unwrap_err();
    assert!(err.to_string().contains("missing page 3"), "{err}");
    enc.encode_page(3, &page(512, 3)).unwrap();
    let err = enc.finish(Checksum::EMPTY_DATABASE).unwrap_err();
    assert!(
        matches!(err, LtxError::PostApplyChecksumMismatch { .. }),
        "{err}"
    );
    let pages: Vec<_> = (1..=3).map(|p| (p, page(512, p as u8))).collect();
    enc.finish(db_checksum(512, &pages)).unwrap();
    verify(&enc.into_inner()[..]).unwrap();
}

#[test]
fn lock_page_is_rejected() {
    let lock = lock_page_number(65536);
    let header = incremental_header(65536, lock + 1, 0);
    let mut enc = Encoder::new(Vec::new(), header).unwrap();
    let err = enc.encode_page(lock, &page(65536, 0)).unwrap_err();
    assert!(err.to_string().contains("lock page"), "{err}");

    let data = page(65536, 0);
    let bytes = raw_file(&header.encode(), &[(lock, &data)], Checksum::EMPTY_DATABASE);
    let err = decode(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        "page block at byte offset 100: page number 16385 is the lock page (it holds byte offset 0x40000000) and must never be stored"
    );
    // The page after the lock page is fine.
    let bytes = raw_file(
        &header.encode(),
        &[(lock + 1, &data)],
        Checksum::EMPTY_DATABASE,
    );
    decode(&bytes).unwrap();
}

#[test]
fn decoder_reports_page_order_with_offsets() {
    let header = incremental_header(4096, 10, 0);
    let data = page(4096, 0);
    let bytes = raw_file(
        &header.encode(),
        &[(7, &data), (3, &data)],
        Checksum::EMPTY_DATABASE,
    );
    let err = decode(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        "page block at byte offset 4200: page number 3 is not greater than previous page 7"
    );
    let bytes = raw_file(&header.encode(), &[(11, &data)], Checksum::EMPTY_DATABASE);
    let err = decode(&bytes).unwrap_err();
    assert!(
        err.to_string()
            .contains("page number 11 is beyond the database size of 10 pages"),
        "{err}"
    );
}

#[test]
fn decoder_reports_incomplete_snapshot() {
    let header = snapshot_header(512, 3, 0);
    let data = page(512, 0);
    let bytes = raw_file(
        &header.encode(),
        &[(1, &data), (3, &data)],
        Checksum::EMPTY_DATABASE,
    );
    assert!(
        decode(&bytes)
            .unwrap_err()
            .to_string()
            .contains("missing page 2")
    );
    let bytes = raw_file(
        &header.encode(),
        &[(1, &data), (2, &data)],
        Checksum::EMPTY_DATABASE,
    );
    let err = decode(&bytes).unwrap_err();
    assert_eq!(
        err.to_string(),
        "page block at byte offset 1132: snapshot ends after page 2 and is missing page 3; it must contain every page from 1 to 3"
    );
}

#[test]
fn decoder_checks_snapshot_post_apply_checksum() {
    let header = snapshot_header(512, 1, 0);
    let data = page(512, 9);
    let bytes = raw_file(
        &header.encode(),
        &[(1, &data)],
        Checksum(Checksum::FLAG | 77),
    );
    let err = decode(&bytes).unwrap_err();
    assert!(
        matches!(err, LtxError::PostApplyChecksumMismatch { .. }),
        "{err}"
    );
    let good = raw_file(&header.encode(), &[(1, &data)], page_checksum(1, &data));
    decode(&good).unwrap();
}

#[test]
fn decoder_reports_file_checksum_mismatch() {
    let pages = vec![(2, page(512, 1))];
    let mut bytes = encode(
        incremental_header(512, 2, 0),
        &pages,
        Checksum::EMPTY_DATABASE,
    );
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    let err = decode(&bytes).unwrap_err();
    let text = err.to_string();
    let (expected, actual) = match err {
        LtxError::FileChecksumMismatch { expected, actual } => (expected, actual),
        other => panic!("unexpected error {other}"),
    };
    assert_eq!(expected.0 ^ actual.0, 1);
    assert_eq!(
        text,
        format!("ltx file checksum mismatch: trailer says 0x{expected}, contents give 0x{actual}")
    );
}

#[test]
fn decoder_rejects_trailing_data_and_truncation() {
    for flags in [0, FLAG_COMPRESS_LZ4] {
        let pages = vec![(1, page(512, 1)), (2, page(512, 2))];
        let bytes = encode(
            snapshot_header(512, 2, flags),
            &pages,
            db_checksum(512, &pages),
        );
        let mut longer = bytes.clone();
        longer.push(0);
        let err = decode(&longer).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "ltx file has unexpected data after the trailer at byte offset {}",
                bytes.len()
            )
        );
        for len in 0..bytes.len() {
            let err = decode(&bytes[..len]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("truncated") || text.contains("ended") || text.contains("LZ4"),
                "length {len}: {text}"
            );
        }
    }
    let err = decode(&[0u8; 50]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ltx data truncated at byte offset 50 while reading the 100-byte header"
    );
    let header = incremental_header(512, 2, 0);
    let bytes = encode(header, &[(2, page(512, 1))], Checksum::EMPTY_DATABASE);
    let err = decode(&bytes[..300]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "ltx data truncated at byte offset 300 while reading the data of page 2"
    );
}

#[test]
fn compressed_frame_must_end_at_terminator() {
    // Build a compressed file whose LZ4 frame holds extra bytes after the terminator.
    let header = incremental_header(512, 2, FLAG_COMPRESS_LZ4);
    let data = page(512, 3);
    let mut block = Vec::new();
    block.extend_from_slice(&2u32.to_be_bytes());
    block.extend_from_slice(&data);
    block.extend_from_slice(&0u32.to_be_bytes());
    block.extend_from_slice(b"extra");
    let mut z = lz4_flex::frame::FrameEncoder::new(Vec::new());
    std::io::Write::write_all(&mut z, &block).unwrap();
    let frame = z.finish().unwrap();
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(&frame);
    bytes.extend_from_slice(&Checksum::EMPTY_DATABASE.0.to_be_bytes());
    bytes.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0]);
    let err = decode(&bytes).unwrap_err();
    assert!(
        err.to_string()
            .contains("more data after the page block terminator"),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("page block at decompressed byte offset 620"),
        "{err}"
    );
}

#[test]
fn decoder_stops_after_error_and_finish_is_idempotent() {
    let header = incremental_header(512, 10, 0);
    let data = page(512, 0);
    let bytes = raw_file(
        &header.encode(),
        &[(7, &data), (3, &data)],
        Checksum::EMPTY_DATABASE,
    );
    let mut dec = Decoder::new(&bytes[..]).unwrap();
    assert_eq!(dec.next_page().unwrap().unwrap().0, 7);
    assert!(dec.next_page().is_err());
    assert!(
        dec.next_page()
            .unwrap_err()
            .to_string()
            .contains("earlier error")
    );
    assert!(dec.finish().is_err());

    let good = encode(header, &[(3, data.clone())], Checksum::EMPTY_DATABASE);
    let mut dec = Decoder::new(&good[..]).unwrap();
    assert!(dec.next_page_into(&mut [0u8; 10]).is_err());
    let t1 = dec.finish().unwrap();
    assert_eq!(dec.finish().unwrap(), t1);
    assert_eq!(dec.next_page().unwrap(), None);
    assert_eq!(dec.page_count(), 1);
}

#[test]
fn dump_lists_header_pages_and_trailer() {
    let pages = vec![(1, page(512, 1)), (2, page(512, 2))];
    let post = db_checksum(512, &pages);
    let bytes = encode(snapshot_header(512, 2, FLAG_COMPRESS_LZ4), &pages, post);
    let mut out = Vec::new();
    let summary = dump(&bytes[..], &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(summary.page_count, 2);
    assert!(
        text.contains("flags               0x00000001 (lz4)"),
        "{text}"
    );
    assert!(text.contains("page size           512"), "{text}");
    assert!(
        text.contains("min txid            0000000000000001 (snapshot)"),
        "{text}"
    );
    assert!(text.contains("2023-11-14T22:13:20.000Z"), "{text}");
    assert!(
        text.contains(&format!(
            "pgno 2          checksum {}",
            page_checksum(2, &pages[1].1)
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("post-apply checksum {post}")),
        "{text}"
    );
    assert!(text.contains("(verified)"), "{text}");

    // A damaged file still lists what came before the damage.
    let mut damaged = encode(snapshot_header(512, 2, 0), &pages, post);
    let n = damaged.len();
    damaged[n - 20] ^= 0xff;
    let mut out = Vec::new();
    assert!(dump(&damaged[..], &mut out).is_err());
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("pgno 1"), "{text}");
    assert!(!text.contains("trailer"), "{text}");
}

/// ltxfs writes LZ4 frames without LZ4's content checksum (the file checksum
/// covers the same bytes), but logs written before that, and other writers, have
/// frames with block and content checksums: those must still decode.
#[test]
fn compressed_frames_with_and_without_lz4_checksums_decode() {
    const FRAME_DESCRIPTOR_FLAGS: usize = HEADER_SIZE + 4;
    const CONTENT_CHECKSUM_FLAG: u8 = 0x04;
    let header = incremental_header(512, 3, FLAG_COMPRESS_LZ4);
    let pages = vec![(1, page(512, 7)), (3, page(512, 9))];
    let ours = encode(header, &pages, Checksum::EMPTY_DATABASE);
    assert_eq!(
        ours[FRAME_DESCRIPTOR_FLAGS] & CONTENT_CHECKSUM_FLAG,
        0,
        "ltxfs's frame has a content checksum"
    );
    let expected = decode(&ours).unwrap();

    let frame = &ours[HEADER_SIZE..ours.len() - TRAILER_SIZE];
    let mut block = Vec::new();
    std::io::Read::read_to_end(&mut lz4_flex::frame::FrameDecoder::new(frame), &mut block).unwrap();
    let info = lz4_flex::frame::FrameInfo::new()
        .content_checksum(true)
        .block_checksums(true);
    let mut z = lz4_flex::frame::FrameEncoder::with_frame_info(info, Vec::new());
    std::io::Write::write_all(&mut z, &block).unwrap();
    let mut checksummed = ours[..HEADER_SIZE].to_vec();
    checksummed.extend_from_slice(&z.finish().unwrap());
    checksummed.extend_from_slice(&ours[ours.len() - TRAILER_SIZE..]);
    assert_ne!(
        checksummed[FRAME_DESCRIPTOR_FLAGS] & CONTENT_CHECKSUM_FLAG,
        0
    );
    assert_eq!(decode(&checksummed).unwrap(), expected);
}
