//! The LTX change-set format: encoding, decoding, verification and checksums.
//!
//! An LTX file describes one transaction, or a contiguous range of
//! transactions, against a SQLite database as the set of pages it changed.
//! ltxfs writes one for every committed transaction and ships them to replicas,
//! which apply them in transaction-ID order.  The layout is the one LiteFS
//! writes (the `ltx` v0.3 line), so files are interchangeable with LiteFS;
//! `docs/ltx.md` describes it byte by byte.
//!
//! This module depends on nothing else in the crate. Encoding, decoding and
//! [`compact`] do no I/O beyond the [`std::io::Read`] and [`std::io::Write`] values
//! handed to them; [`apply`] and [`verify_database_checksum`] work on a database
//! [`std::fs::File`], and [`dump_file`]/[`verify_file`] open the file they inspect.
//!
//! # Invariants
//!
//! The [`Encoder`] and [`Decoder`] enforce the same rules, so anything the
//! encoder writes the decoder accepts:
//!
//! * the page size is a power of two between 512 and 65536;
//! * `1 <= min_txid <= max_txid`; a file with `min_txid == 1` is a snapshot;
//! * a snapshot has a zero pre-apply checksum and contains exactly the pages
//!   `1..=commit` except the lock page, and its post-apply checksum equals the
//!   checksum of those pages; any other file has a non-zero pre-apply checksum;
//! * every non-zero checksum has bit 63 set;
//! * page numbers are non-zero, strictly increasing, at most `commit`, and
//!   never the lock page (see [`lock_page_number`]);
//! * unknown flag bits, non-zero padding, and bytes after the trailer are errors;
//! * the file checksum covers the header, the uncompressed page block and the
//!   post-apply checksum.
//!
//! Malformed input never panics; every problem is an [`LtxError`] whose
//! message names the field or byte offset at fault.
//!
//! # Example
//!
//! ```
//! use ltxfs::ltx::{Checksum, DatabaseChecksum, Decoder, Encoder, Header, TxId};
//!
//! let header = Header {
//!     page_size: 512,
//!     commit: 1,
//!     min_txid: TxId(1),
//!     max_txid: TxId(1),
//!     timestamp: 1_700_000_000_000,
//!     ..Header::default()
//! };
//! let page = vec![0x42; 512];
//! let mut db = DatabaseChecksum::new(512)?;
//! db.add_page(1, &page);
//!
//! let mut file = Vec::new();
//! let mut encoder = Encoder::new(&mut file, header)?;
//! encoder.encode_page(1, &page)?;
//! encoder.finish(db.value())?;
//!
//! let mut decoder = Decoder::new(&file[..])?;
//! assert_eq!(decoder.next_page()?, Some((1, page)));
//! assert_eq!(decoder.next_page()?, None);
//! assert_eq!(decoder.finish()?.post_apply_checksum, db.value());
//! # Ok::<(), ltxfs::ltx::LtxError>(())
//! ```

mod apply;
mod checksum;
mod compact;
mod decoder;
mod encoder;
mod error;
mod header;
mod inspect;
mod io_util;
mod pages;

pub use apply::{ApplyOutcome, apply, verify_database_checksum};
pub use checksum::{Checksum, DatabaseChecksum, checksum_database, crc64, page_checksum};
pub use compact::{
    OntoSnapshot, compact, compact_onto_snapshot, compact_onto_snapshot_with, compact_within,
};
pub use decoder::Decoder;
pub use encoder::Encoder;
pub use error::LtxError;
pub use header::{
    FLAG_COMPRESS_LZ4, HEADER_SIZE, Header, KNOWN_FLAGS, MAGIC, MAX_PAGE_SIZE, MIN_PAGE_SIZE,
    PAGE_HEADER_SIZE, PENDING_BYTE, TRAILER_SIZE, Trailer, TxId, format_filename,
    is_valid_page_size, lock_page_number, parse_filename,
};
pub use inspect::{Summary, dump, format_timestamp_millis, verify};
pub use inspect::{dump_file, verify_file};

#[cfg(test)]
mod tests;
