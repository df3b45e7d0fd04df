//! The fixed-size parts of an LTX file (the 100-byte header and the 16-byte
//! trailer), transaction IDs, page-size rules and file names.

use std::fmt;
use std::str::FromStr;

use super::checksum::Checksum;
use super::error::LtxError;

/// The four magic bytes at the start of every LTX file.
pub const MAGIC: [u8; 4] = *b"LTX1";

/// The size of the header in bytes.
pub const HEADER_SIZE: usize = 100;

/// The size of the trailer in bytes.
pub const TRAILER_SIZE: usize = 16;

/// The size of the page number that precedes each page in the page block.
pub const PAGE_HEADER_SIZE: usize = 4;

/// Header flag: the page block is stored as a single LZ4 frame.
pub const FLAG_COMPRESS_LZ4: u32 = 0x0000_0001;

/// Every header flag bit this implementation understands.
pub const KNOWN_FLAGS: u32 = FLAG_COMPRESS_LZ4;

/// The smallest page size SQLite supports.
pub const MIN_PAGE_SIZE: u32 = 512;

/// The largest page size SQLite supports.
pub const MAX_PAGE_SIZE: u32 = 65536;

/// The byte offset SQLite reserves for locking; the page holding it (the lock
/// page) never contains data and never appears in an LTX file.
pub const PENDING_BYTE: u64 = 0x4000_0000;

/// Byte offsets of the header fields, used in error messages.
mod offset {
    pub const FLAGS: usize = 4;
    pub const PAGE_SIZE: usize = 8;
    pub const COMMIT: usize = 12;
    pub const MIN_TXID: usize = 16;
    pub const MAX_TXID: usize = 24;
    pub const TIMESTAMP: usize = 32;
    pub const PRE_APPLY_CHECKSUM: usize = 40;
    pub const WAL_OFFSET: usize = 48;
    pub const WAL_SIZE: usize = 56;
    pub const WAL_SALT1: usize = 64;
    pub const WAL_SALT2: usize = 68;
    pub const NODE_ID: usize = 72;
    pub const PADDING: usize = 80;
}

/// Returns true if `page_size` is a power of two between 512 and 65536.
pub fn is_valid_page_size(page_size: u32) -> bool {
    (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) && page_size.is_power_of_two()
}

/// Returns the number of the lock page: the page holding byte offset
/// `0x40000000` ([`PENDING_BYTE`]), which is `0x40000000 / page_size + 1`.
///
/// For a page size of zero, which is never valid, this returns 0, which is
/// never a real page number.
pub fn lock_page_number(page_size: u32) -> u32 {
    match PENDING_BYTE.checked_div(u64::from(page_size)) {
        // The quotient is at most 0x40000000, so it fits in a u32 with room for the +1.
        Some(q) => u32::try_from(q + 1).unwrap_or(u32::MAX),
        None => 0,
    }
}

/// Parses exactly 16 lower-case hex digits.
pub(crate) fn parse_hex16(s: &str) -> Option<u64> {
    if s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        u64::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

/// A transaction ID.  Transaction IDs start at 1 and increase by one per
/// committed transaction.
///
/// `Display` prints exactly 16 lower-case hex digits (the form used in file
/// names), and `FromStr` accepts exactly that form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TxId(pub u64);

impl TxId {
    /// Returns the raw 64-bit value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for TxId {
    type Err = LtxError;

    /// Parses exactly 16 lower-case hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex16(s).map(TxId).ok_or_else(|| {
            LtxError::InvalidArgument(format!(
                "transaction ID {s:?} is not 16 lower-case hex digits"
            ))
        })
    }
}

/// Returns the file name of an LTX file covering `min..=max`:
/// `%016x-%016x.ltx` in lower-case hex.
pub fn format_filename(min_txid: TxId, max_txid: TxId) -> String {
    format!("{min_txid}-{max_txid}.ltx")
}

/// Parses a file name of the form `%016x-%016x.ltx` (lower-case hex, nothing
/// before or after) into its minimum and maximum transaction IDs.
///
/// The check is purely syntactic: the IDs are not required to be ordered.
pub fn parse_filename(name: &str) -> Result<(TxId, TxId), LtxError> {
    let invalid = |message: &str| LtxError::InvalidFilename {
        name: name.to_owned(),
        message: message.to_owned(),
    };
    let stem = name
        .strip_suffix(".ltx")
        .ok_or_else(|| invalid("does not end in \".ltx\""))?;
    let (min, max) = stem
        .split_once('-')
        .ok_or_else(|| invalid("has no '-' between the two transaction IDs"))?;
    let min = parse_hex16(min)
        .ok_or_else(|| invalid("minimum transaction ID is not 16 lower-case hex digits"))?;
    let max = parse_hex16(max)
        .ok_or_else(|| invalid("maximum transaction ID is not 16 lower-case hex digits"))?;
    Ok((TxId(min), TxId(max)))
}

/// The 100-byte header at the start of every LTX file.
///
/// `Default` gives an all-zero header, which is not valid by itself; it is a
/// convenient base for struct-update syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Flag bits; only [`FLAG_COMPRESS_LZ4`] is defined.
    pub flags: u32,
    /// The database page size in bytes.
    pub page_size: u32,
    /// The database size in pages after the transaction; 0 means the database was deleted.
    pub commit: u32,
    /// The first transaction ID covered by the file.
    pub min_txid: TxId,
    /// The last transaction ID covered by the file.
    pub max_txid: TxId,
    /// When the transaction was written, in milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// The database checksum before applying the file; zero for a snapshot.
    pub pre_apply_checksum: Checksum,
    /// The offset of the source frames in the WAL, or zero if not from a WAL.
    pub wal_offset: u64,
    /// The size of the source frames in the WAL, or zero if not from a WAL.
    pub wal_size: u64,
    /// The first salt of the source WAL header, or zero.
    pub wal_salt1: u32,
    /// The second salt of the source WAL header, or zero.
    pub wal_salt2: u32,
    /// The ID of the node that wrote the file, or zero if unknown.
    pub node_id: u64,
}

/// Copies `N` bytes starting at `at` out of a header-sized array.
fn array_at<const N: usize>(bytes: &[u8; HEADER_SIZE], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = bytes.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

impl Header {
    /// Returns true if the file is a snapshot (its minimum TXID is 1), which
    /// must contain every page of the database.
    pub fn is_snapshot(&self) -> bool {
        self.min_txid == TxId(1)
    }

    /// Returns true if the page block is LZ4-compressed.
    pub fn is_compressed(&self) -> bool {
        self.flags & FLAG_COMPRESS_LZ4 != 0
    }

    /// Returns the lock page number for this header's page size.
    pub fn lock_page_number(&self) -> u32 {
        lock_page_number(self.page_size)
    }

    /// Returns the canonical file name for this header's transaction range.
    pub fn filename(&self) -> String {
        format_filename(self.min_txid, self.max_txid)
    }

    /// Serializes the header into its 100-byte form.  This does not validate;
    /// call [`Header::validate`] first if the header is not known to be good.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        let mut put = |at: usize, src: &[u8]| {
            if let Some(dst) = b.get_mut(at..at + src.len()) {
                dst.copy_from_slice(src);
            }
        };
        put(0, &MAGIC);
        put(offset::FLAGS, &self.flags.to_be_bytes());
        put(offset::PAGE_SIZE, &self.page_size.to_be_bytes());
        put(offset::COMMIT, &self.commit.to_be_bytes());
        put(offset::MIN_TXID, &self.min_txid.0.to_be_bytes());
        put(offset::MAX_TXID, &self.max_txid.0.to_be_bytes());
        put(offset::TIMESTAMP, &self.timestamp.to_be_bytes());
        put(
            offset::PRE_APPLY_CHECKSUM,
            &self.pre_apply_checksum.0.to_be_bytes(),
        );
        put(offset::WAL_OFFSET, &self.wal_offset.to_be_bytes());
        put(offset::WAL_SIZE, &self.wal_size.to_be_bytes());
        put(offset::WAL_SALT1, &self.wal_salt1.to_be_bytes());
        put(offset::WAL_SALT2, &self.wal_salt2.to_be_bytes());
        put(offset::NODE_ID, &self.node_id.to_be_bytes());
        b
    }

    /// Parses and validates a 100-byte header.
    ///
    /// `bytes` must be exactly [`HEADER_SIZE`] bytes long.  The magic, the
    /// zero padding and every rule of [`Header::validate`] are checked.
    pub fn decode(bytes: &[u8]) -> Result<Header, LtxError> {
        let bytes: &[u8; HEADER_SIZE] = bytes.try_into().map_err(|_| LtxError::InvalidHeader {
            field: "length",
            message: format!("expected {HEADER_SIZE} bytes, got {}", bytes.len()),
        })?;
        let magic: [u8; 4] = array_at(bytes, 0);
        if magic != MAGIC {
            return Err(LtxError::InvalidHeader {
                field: "magic",
                message: format!(
                    "magic at byte offset 0 is {:?}, expected \"LTX1\"",
                    String::from_utf8_lossy(&magic)
                ),
            });
        }
        let u32_at = |at| u32::from_be_bytes(array_at(bytes, at));
        let u64_at = |at| u64::from_be_bytes(array_at(bytes, at));
        let header = Header {
            flags: u32_at(offset::FLAGS),
            page_size: u32_at(offset::PAGE_SIZE),
            commit: u32_at(offset::COMMIT),
            min_txid: TxId(u64_at(offset::MIN_TXID)),
            max_txid: TxId(u64_at(offset::MAX_TXID)),
            timestamp: u64_at(offset::TIMESTAMP),
            pre_apply_checksum: Checksum(u64_at(offset::PRE_APPLY_CHECKSUM)),
            wal_offset: u64_at(offset::WAL_OFFSET),
            wal_size: u64_at(offset::WAL_SIZE),
            wal_salt1: u32_at(offset::WAL_SALT1),
            wal_salt2: u32_at(offset::WAL_SALT2),
            node_id: u64_at(offset::NODE_ID),
        };
        if let Some((i, b)) = bytes
            .iter()
            .enumerate()
            .skip(offset::PADDING)
            .find(|(_, b)| **b != 0)
        {
            return Err(LtxError::InvalidHeader {
                field: "padding",
                message: format!("padding byte at byte offset {i} is 0x{b:02x}, expected zero"),
            });
        }
        header.validate()?;
        Ok(header)
    }

    /// Checks every rule a header must satisfy on its own:
    ///
    /// * no unknown flag bits;
    /// * the page size is a power of two between 512 and 65536;
    /// * the minimum TXID is at least 1 and the maximum is not below it;
    /// * a snapshot has a zero pre-apply checksum; any other file has a
    ///   non-zero pre-apply checksum with bit 63 set.
    pub fn validate(&self) -> Result<(), LtxError> {
        let invalid = |field, message: String| Err(LtxError::InvalidHeader { field, message });
        if self.flags & !KNOWN_FLAGS != 0 {
            return invalid(
                "flags",
                format!(
                    "flags 0x{:08x} (byte offset {}) have unknown bits 0x{:08x} set; only 0x{:08x} (LZ4 compression) is defined",
                    self.flags,
                    offset::FLAGS,
                    self.flags & !KNOWN_FLAGS,
                    KNOWN_FLAGS
                ),
            );
        }
        if !is_valid_page_size(self.page_size) {
            return invalid(
                "page_size",
                format!(
                    "page size {} is not a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}",
                    self.page_size
                ),
            );
        }
        if self.min_txid.0 == 0 {
            return invalid(
                "min_txid",
                "minimum TXID is 0; transaction IDs start at 1".to_owned(),
            );
        }
        if self.max_txid < self.min_txid {
            return invalid(
                "max_txid",
                format!(
                    "maximum TXID {} is less than minimum TXID {}",
                    self.max_txid, self.min_txid
                ),
            );
        }
        let pre = self.pre_apply_checksum;
        if self.is_snapshot() {
            if !pre.is_zero() {
                return invalid(
                    "pre_apply_checksum",
                    format!(
                        "pre-apply checksum of a snapshot (minimum TXID 1) must be zero, found 0x{pre}"
                    ),
                );
            }
        } else if pre.is_zero() {
            return invalid(
                "pre_apply_checksum",
                format!(
                    "pre-apply checksum is zero, but a file starting at TXID {} (not a snapshot) requires one",
                    self.min_txid
                ),
            );
        } else if !pre.has_flag() {
            return invalid(
                "pre_apply_checksum",
                format!("pre-apply checksum 0x{pre} does not have bit 63 set"),
            );
        }
        Ok(())
    }
}

/// The 16-byte trailer at the end of every LTX file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trailer {
    /// The database checksum after applying the file.
    pub post_apply_checksum: Checksum,
    /// The CRC-64 of the header, the uncompressed page block and the
    /// post-apply checksum, with bit 63 set.
    pub file_checksum: Checksum,
}

impl Trailer {
    /// Serializes the trailer into its 16-byte form (without validating).
    pub fn encode(&self) -> [u8; TRAILER_SIZE] {
        let mut b = [0u8; TRAILER_SIZE];
        let (post, file) = b.split_at_mut(8);
        post.copy_from_slice(&self.post_apply_checksum.0.to_be_bytes());
        file.copy_from_slice(&self.file_checksum.0.to_be_bytes());
        b
    }

    /// Parses and validates a 16-byte trailer.  The file checksum is not
    /// compared against anything here; [`Decoder::finish`](super::Decoder::finish) does that.
    pub fn decode(bytes: &[u8]) -> Result<Trailer, LtxError> {
        let bytes: &[u8; TRAILER_SIZE] =
            bytes.try_into().map_err(|_| LtxError::InvalidTrailer {
                field: "length",
                message: format!("expected {TRAILER_SIZE} bytes, got {}", bytes.len()),
            })?;
        let trailer = Self::from_array(bytes);
        trailer.validate()?;
        Ok(trailer)
    }

    /// Splits a trailer array into its fields without validating.
    pub(crate) fn from_array(bytes: &[u8; TRAILER_SIZE]) -> Trailer {
        let mut post = [0u8; 8];
        let mut file = [0u8; 8];
        let (a, b) = bytes.split_at(8);
        post.copy_from_slice(a);
        file.copy_from_slice(b);
        Trailer {
            post_apply_checksum: Checksum(u64::from_be_bytes(post)),
            file_checksum: Checksum(u64::from_be_bytes(file)),
        }
    }

    /// Checks that both checksums have bit 63 set (and so are non-zero): the
    /// post-apply checksum is a database checksum and the file checksum is a
    /// CRC with the flag bit, and both always carry it.
    pub fn validate(&self) -> Result<(), LtxError> {
        validate_post_apply_checksum(self.post_apply_checksum)?;
        if !self.file_checksum.has_flag() {
            return Err(LtxError::InvalidTrailer {
                field: "file_checksum",
                message: format!(
                    "file checksum 0x{} does not have bit 63 set",
                    self.file_checksum
                ),
            });
        }
        Ok(())
    }
}

/// Checks that a post-apply checksum has bit 63 set.
pub(crate) fn validate_post_apply_checksum(checksum: Checksum) -> Result<(), LtxError> {
    if checksum.has_flag() {
        Ok(())
    } else {
        Err(LtxError::InvalidTrailer {
            field: "post_apply_checksum",
            message: format!(
                "post-apply checksum 0x{checksum} does not have bit 63 set (the checksum of an empty database is 0x{})",
                Checksum::EMPTY_DATABASE
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_header() -> Header {
        Header {
            page_size: 4096,
            commit: 3,
            min_txid: TxId(1),
            max_txid: TxId(5),
            timestamp: 1_700_000_000_000,
            ..Header::default()
        }
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            flags: FLAG_COMPRESS_LZ4,
            page_size: 512,
            commit: 0xdead,
            min_txid: TxId(7),
            max_txid: TxId(9),
            timestamp: 0x0102_0304_0506_0708,
            pre_apply_checksum: Checksum(0x8000_0000_1234_5678),
            wal_offset: 32,
            wal_size: 4096,
            wal_salt1: 0xaabb_ccdd,
            wal_salt2: 0x1122_3344,
            node_id: 42,
        };
        let bytes = h.encode();
        assert_eq!(&bytes[0..4], b"LTX1");
        assert_eq!(&bytes[8..12], &512u32.to_be_bytes());
        assert!(bytes[80..].iter().all(|b| *b == 0));
        assert_eq!(Header::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn header_rejects_bad_fields() {
        let check = |h: Header, field: &str, text: &str| {
            let err = h.validate().unwrap_err();
            match &err {
                LtxError::InvalidHeader { field: f, .. } => assert_eq!(*f, field, "{err}"),
                other => panic!("unexpected error {other}"),
            }
            assert!(err.to_string().contains(text), "{err} lacks {text}");
            // Decoding the encoded form must reject it the same way.
            assert!(Header::decode(&h.encode()).is_err());
        };
        let good = snapshot_header();
        good.validate().unwrap();
        check(
            Header {
                page_size: 1000,
                ..good
            },
            "page_size",
            "ltx header: page size 1000 is not a power of two between 512 and 65536",
        );
        check(
            Header {
                page_size: 256,
                ..good
            },
            "page_size",
            "256",
        );
        check(
            Header {
                page_size: 131072,
                ..good
            },
            "page_size",
            "131072",
        );
        check(
            Header { flags: 2, ..good },
            "flags",
            "unknown bits 0x00000002",
        );
        check(
            Header {
                min_txid: TxId(0),
                ..good
            },
            "min_txid",
            "minimum TXID is 0",
        );
        check(
            Header {
                min_txid: TxId(6),
                max_txid: TxId(5),
                pre_apply_checksum: Checksum(Checksum::FLAG),
                ..good
            },
            "max_txid",
            "less than minimum",
        );
        check(
            Header {
                pre_apply_checksum: Checksum(Checksum::FLAG),
                ..good
            },
            "pre_apply_checksum",
            "must be zero",
        );
        check(
            Header {
                min_txid: TxId(2),
                ..good
            },
            "pre_apply_checksum",
            "requires one",
        );
        check(
            Header {
                min_txid: TxId(2),
                pre_apply_checksum: Checksum(5),
                ..good
            },
            "pre_apply_checksum",
            "bit 63",
        );
    }

    #[test]
    fn header_decode_rejects_magic_padding_and_length() {
        let mut bytes = snapshot_header().encode();
        bytes[99] = 1;
        let err = Header::decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("byte offset 99"), "{err}");
        let mut bytes = snapshot_header().encode();
        bytes[0] = b'X';
        assert!(
            Header::decode(&bytes)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        assert!(
            Header::decode(&bytes[..99])
                .unwrap_err()
                .to_string()
                .contains("got 99")
        );
    }

    #[test]
    fn lock_page_numbers() {
        assert_eq!(lock_page_number(512), 2_097_153);
        assert_eq!(lock_page_number(4096), 262_145);
        assert_eq!(lock_page_number(65536), 16_385);
        assert_eq!(lock_page_number(0), 0);
    }

    #[test]
    fn filenames() {
        assert_eq!(
            format_filename(TxId(1), TxId(0x2a)),
            "0000000000000001-000000000000002a.ltx"
        );
        assert_eq!(
            parse_filename("0000000000000001-000000000000002a.ltx").unwrap(),
            (TxId(1), TxId(42))
        );
        for bad in [
            "0000000000000001-000000000000002A.ltx",
            "0000000000000001-000000000000002a",
            "0000000000000001_000000000000002a.ltx",
            "000000000000001-000000000000002a.ltx",
            "x0000000000000001-000000000000002a.ltx",
            "0000000000000001-000000000000002a.ltx.tmp",
            "+000000000000001-000000000000002a.ltx",
            "",
        ] {
            assert!(parse_filename(bad).is_err(), "{bad} accepted");
        }
        assert_eq!("00000000000000ff".parse::<TxId>().unwrap(), TxId(255));
        assert_eq!(TxId(255).to_string(), "00000000000000ff");
    }

    #[test]
    fn trailer_round_trip_and_validation() {
        let t = Trailer {
            post_apply_checksum: Checksum::EMPTY_DATABASE,
            file_checksum: Checksum(0x8000_0000_0000_0001),
        };
        assert_eq!(Trailer::decode(&t.encode()).unwrap(), t);
        let bad = Trailer {
            post_apply_checksum: Checksum(0),
            ..t
        };
        assert!(
            Trailer::decode(&bad.encode())
                .unwrap_err()
                .to_string()
                .contains("post-apply")
        );
        let bad = Trailer {
            file_checksum: Checksum(1),
            ..t
        };
        assert!(
            Trailer::decode(&bad.encode())
                .unwrap_err()
                .to_string()
                .contains("file checksum")
        );
        assert!(Trailer::decode(&[0; 15]).is_err());
    }
}
