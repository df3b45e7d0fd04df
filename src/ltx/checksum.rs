//! CRC-64 checksums used by LTX: page checksums, the rolling database checksum
//! and the raw CRC behind the file checksum.
//!
//! All checksums use CRC-64 with the ISO polynomial exactly as Go's
//! `hash/crc64` computes it with `crc64.ISO` (the `CRC-64/GO-ISO` catalogue
//! entry; the check value of `"123456789"` is `0xb90956c775a41001`).
//!
//! Every checksum stored in an LTX file has bit 63 set, so that a zero value can
//! mean "no checksum" and is never produced by a real computation.  The
//! database checksum is the XOR of the page checksums of every page except the
//! lock page; because XOR is its own inverse it can be maintained
//! incrementally by [`DatabaseChecksum`] as pages change, without rereading the
//! database.

use std::fmt;
use std::io::Read;
use std::str::FromStr;

use crc_fast::{CrcAlgorithm, Digest};

use super::error::LtxError;
use super::header::{is_valid_page_size, lock_page_number, parse_hex16};
use super::io_util::read_full;

/// A running CRC-64 computation (used for the file checksum). `crc_fast` folds
/// with the CPU's carry-less multiply where there is one (about ten times the
/// speed of a slice-by-16 table here) and falls back to a table elsewhere.
pub(crate) type Crc64Digest = Digest;

/// Starts a new running CRC-64 computation.
pub(crate) fn crc64_digest() -> Crc64Digest {
    Digest::new(CrcAlgorithm::Crc64GoIso)
}

/// Returns the raw CRC-64/GO-ISO of `data`, without the LTX flag bit.
///
/// `crc64(b"123456789")` is `0xb90956c775a41001`.
pub fn crc64(data: &[u8]) -> u64 {
    crc_fast::checksum(CrcAlgorithm::Crc64GoIso, data)
}

/// A 64-bit LTX checksum.
///
/// Checksums written by LTX always have bit 63 ([`Checksum::FLAG`]) set; the
/// value zero is reserved for "no checksum" (for example, the pre-apply
/// checksum of a snapshot).  `Display` prints exactly 16 lower-case hex
/// digits, and `FromStr` accepts exactly that form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Checksum(pub u64);

impl Checksum {
    /// Bit 63, set on every computed checksum.
    pub const FLAG: u64 = 1 << 63;

    /// The "no checksum" value.
    pub const ZERO: Checksum = Checksum(0);

    /// The checksum of a database with no pages (also the post-apply checksum
    /// of a transaction that deletes the database).
    pub const EMPTY_DATABASE: Checksum = Checksum(Self::FLAG);

    /// Returns the raw 64-bit value.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// Returns true if bit 63 is set, as it is on every computed checksum.
    pub const fn has_flag(self) -> bool {
        self.0 & Self::FLAG != 0
    }

    /// Returns true for the reserved "no checksum" value.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl FromStr for Checksum {
    type Err = LtxError;

    /// Parses exactly 16 lower-case hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex16(s).map(Checksum).ok_or_else(|| {
            LtxError::InvalidArgument(format!("checksum {s:?} is not 16 lower-case hex digits"))
        })
    }
}

/// Returns the LTX checksum of one page: the CRC-64 of the page number as a
/// big-endian `u32` followed by the page bytes, with bit 63 set.
pub fn page_checksum(pgno: u32, page: &[u8]) -> Checksum {
    let mut digest = crc64_digest();
    digest.update(&pgno.to_be_bytes());
    digest.update(page);
    Checksum(digest.finalize() | Checksum::FLAG)
}

/// An incrementally maintained database checksum.
///
/// The database checksum is the XOR of the [`page_checksum`] of every page of
/// the database except the lock page, with bit 63 set.  A database with no
/// pages has the checksum [`Checksum::EMPTY_DATABASE`].
///
/// Because XOR is its own inverse, a page can be removed by XOR-ing its old
/// checksum out again, so callers keep one accumulator per database and update
/// it as transactions are applied:
///
/// * a page written for the first time: [`add_page`](Self::add_page);
/// * a page overwritten: [`replace_page`](Self::replace_page) with the old and new contents;
/// * a truncation: [`remove_page`](Self::remove_page) for every page past the new end.
///
/// The lock page is silently ignored by every method, so callers may pass it
/// without special-casing it.  The accumulator cannot tell whether a page was
/// really present; removing a page that was never added corrupts the value, so
/// callers must pair additions and removals correctly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseChecksum {
    page_size: u32,
    lock_pgno: u32,
    /// The XOR of the page checksums, with bit 63 cleared.  Bit 63 of the XOR
    /// only records the parity of the page count and is forced on by
    /// [`DatabaseChecksum::value`], so it carries no information.
    xor: u64,
}

impl DatabaseChecksum {
    /// Creates the accumulator for an empty database with the given page size.
    ///
    /// The page size must be a power of two between 512 and 65536.
    pub fn new(page_size: u32) -> Result<Self, LtxError> {
        if !is_valid_page_size(page_size) {
            return Err(LtxError::InvalidArgument(format!(
                "page size {page_size} is not a power of two between 512 and 65536"
            )));
        }
        Ok(DatabaseChecksum {
            page_size,
            lock_pgno: lock_page_number(page_size),
            xor: 0,
        })
    }

    /// Resumes from a known database checksum, for example the post-apply
    /// checksum of the last transaction applied.
    ///
    /// The checksum must have bit 63 set, as every database checksum does.
    pub fn from_checksum(page_size: u32, checksum: Checksum) -> Result<Self, LtxError> {
        if !checksum.has_flag() {
            return Err(LtxError::InvalidArgument(format!(
                "database checksum 0x{checksum} does not have bit 63 set"
            )));
        }
        let mut acc = Self::new(page_size)?;
        acc.xor = checksum.0 & !Checksum::FLAG;
        Ok(acc)
    }

    /// Returns the page size this accumulator was created with.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Returns the lock page number for this accumulator's page size.
    pub fn lock_page_number(&self) -> u32 {
        self.lock_pgno
    }

    /// Toggles one page checksum in or out of the XOR, ignoring the lock page.
    fn toggle(&mut self, pgno: u32, checksum: Checksum) {
        if pgno != self.lock_pgno {
            self.xor ^= checksum.0 & !Checksum::FLAG;
        }
    }

    /// Adds a page that was not part of the database before.
    pub fn add_page(&mut self, pgno: u32, page: &[u8]) {
        if pgno != self.lock_pgno {
            self.toggle(pgno, page_checksum(pgno, page));
        }
    }

    /// Removes a page that was part of the database, given its current contents.
    pub fn remove_page(&mut self, pgno: u32, page: &[u8]) {
        // Removing is the same XOR as adding.
        self.add_page(pgno, page);
    }

    /// Replaces the contents of an existing page.
    pub fn replace_page(&mut self, pgno: u32, old: &[u8], new: &[u8]) {
        self.remove_page(pgno, old);
        self.add_page(pgno, new);
    }

    /// Adds a page by its precomputed [`page_checksum`].
    pub fn add_page_checksum(&mut self, pgno: u32, checksum: Checksum) {
        self.toggle(pgno, checksum);
    }

    /// Removes a page by its precomputed [`page_checksum`].
    pub fn remove_page_checksum(&mut self, pgno: u32, checksum: Checksum) {
        self.toggle(pgno, checksum);
    }

    /// Returns the current database checksum (always with bit 63 set).
    pub fn value(&self) -> Checksum {
        Checksum(self.xor | Checksum::FLAG)
    }
}

/// Computes the database checksum of the first `page_count` pages read from
/// `reader` (typically a SQLite database file).
///
/// The lock page is read but not included.  Bytes after the last page are not
/// read.  A reader that ends before `page_count` pages gives
/// [`LtxError::Truncated`] naming the page.
pub fn checksum_database<R: Read>(
    mut reader: R,
    page_size: u32,
    page_count: u32,
) -> Result<Checksum, LtxError> {
    let mut acc = DatabaseChecksum::new(page_size)?;
    let mut page = vec![0u8; page_size as usize];
    for pgno in 1..=page_count {
        let n = read_full(&mut reader, &mut page)
            .map_err(|e| LtxError::io(format!("reading database page {pgno}"), e))?;
        if n < page.len() {
            return Err(LtxError::Truncated {
                offset: u64::from(pgno - 1) * u64::from(page_size) + n as u64,
                what: format!("database page {pgno} of {page_count}"),
            });
        }
        acc.add_page(pgno, &page);
    }
    Ok(acc.value())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_check_value_matches_go_iso() {
        assert_eq!(crc64(b"123456789"), 0xb90956c775a41001);
    }

    #[test]
    fn empty_database_checksum() {
        let acc = DatabaseChecksum::new(4096).unwrap();
        assert_eq!(acc.value(), Checksum::EMPTY_DATABASE);
        assert_eq!(acc.value().0, 0x8000000000000000);
    }

    #[test]
    fn page_checksum_covers_page_number() {
        let page = [7u8; 512];
        let a = page_checksum(1, &page);
        let b = page_checksum(2, &page);
        assert_ne!(a, b);
        assert!(a.has_flag() && b.has_flag());
        let mut raw = 1u32.to_be_bytes().to_vec();
        raw.extend_from_slice(&page);
        assert_eq!(a.0, crc64(&raw) | Checksum::FLAG);
    }

    #[test]
    fn add_then_remove_returns_to_empty() {
        let mut acc = DatabaseChecksum::new(512).unwrap();
        acc.add_page(1, &[1; 512]);
        acc.add_page(2, &[2; 512]);
        assert_ne!(acc.value(), Checksum::EMPTY_DATABASE);
        acc.remove_page(2, &[2; 512]);
        acc.remove_page(1, &[1; 512]);
        assert_eq!(acc.value(), Checksum::EMPTY_DATABASE);
    }

    #[test]
    fn lock_page_is_ignored() {
        let mut acc = DatabaseChecksum::new(65536).unwrap();
        let lock = acc.lock_page_number();
        assert_eq!(lock, 16385);
        acc.add_page(lock, &[9; 16]);
        acc.add_page_checksum(lock, Checksum(0x8123));
        assert_eq!(acc.value(), Checksum::EMPTY_DATABASE);
    }

    #[test]
    fn resume_from_checksum() {
        let mut acc = DatabaseChecksum::new(512).unwrap();
        acc.add_page(1, &[1; 512]);
        let mut resumed = DatabaseChecksum::from_checksum(512, acc.value()).unwrap();
        acc.add_page(2, &[2; 512]);
        resumed.add_page(2, &[2; 512]);
        assert_eq!(acc.value(), resumed.value());
        assert!(DatabaseChecksum::from_checksum(512, Checksum(1)).is_err());
    }

    #[test]
    fn checksum_database_matches_accumulator_and_reports_truncation() {
        let mut db = Vec::new();
        let mut acc = DatabaseChecksum::new(512).unwrap();
        for pgno in 1..=3u32 {
            let page = vec![pgno as u8; 512];
            acc.add_page(pgno, &page);
            db.extend_from_slice(&page);
        }
        assert_eq!(checksum_database(&db[..], 512, 3).unwrap(), acc.value());
        assert_eq!(
            checksum_database(&db[..], 512, 0).unwrap(),
            Checksum::EMPTY_DATABASE
        );
        let err = checksum_database(&db[..1000], 512, 3).unwrap_err();
        assert!(err.to_string().contains("database page 2 of 3"), "{err}");
        assert!(err.to_string().contains("byte offset 1000"), "{err}");
        assert!(checksum_database(&db[..], 1000, 1).is_err());
    }

    #[test]
    fn checksum_display_and_parse() {
        let c = Checksum(0x8000_0000_0000_00ab);
        assert_eq!(c.to_string(), "80000000000000ab");
        assert_eq!("80000000000000ab".parse::<Checksum>().unwrap(), c);
        assert!("80000000000000AB".parse::<Checksum>().is_err());
        assert!("abc".parse::<Checksum>().is_err());
    }
}
