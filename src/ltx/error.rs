//! The error type shared by every part of the LTX module.
//!
//! Every message names the field, the page, or the byte offset that was wrong so
//! that an operator reading a log line (or the output of `ltxfs ltx verify`) can
//! find the damaged spot without a debugger.

use std::io;

use super::checksum::Checksum;

/// An error produced while encoding, decoding, or checksumming LTX data.
///
/// Decoding never panics on malformed input: every problem with the bytes is
/// reported through one of these variants instead.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LtxError {
    /// A header field is malformed or breaks a format rule.
    ///
    /// `field` is a short machine-friendly name such as `"page_size"`; the
    /// message itself names the field in words and gives the offending value.
    #[error("ltx header: {message}")]
    InvalidHeader {
        /// The header field at fault, e.g. `"page_size"` or `"padding"`.
        field: &'static str,
        /// A full description of the problem.
        message: String,
    },

    /// A trailer field is malformed.
    #[error("ltx trailer: {message}")]
    InvalidTrailer {
        /// The trailer field at fault: `"post_apply_checksum"`, `"file_checksum"` or `"length"`.
        field: &'static str,
        /// A full description of the problem.
        message: String,
    },

    /// The page block breaks a format rule: wrong page order, a page beyond
    /// the commit size, the lock page, an incomplete snapshot, a short read, and
    /// so on.
    ///
    /// `offset` is the byte offset of the page record (or terminator) at fault,
    /// counted in the uncompressed layout of the file.  For an uncompressed file
    /// this is the offset in the file itself; for an LZ4-compressed file it is
    /// the offset the record would have had without compression, which is why
    /// the message then says "decompressed".
    #[error("{}: {message}", describe_page_block_offset(*offset, *compressed))]
    InvalidPageBlock {
        /// The byte offset of the record at fault (see above).
        offset: u64,
        /// Whether the page block is LZ4-compressed.
        compressed: bool,
        /// A full description of the problem.
        message: String,
    },

    /// The LZ4 frame holding a compressed page block could not be decoded.
    #[error(
        "ltx page block: LZ4 frame is corrupt or unreadable (compressed stream read up to byte offset {offset}): {source}"
    )]
    Lz4 {
        /// How many bytes of the file had been read when the error surfaced.
        offset: u64,
        /// The error reported by the LZ4 decoder or the underlying reader.
        #[source]
        source: io::Error,
    },

    /// The file checksum stored in the trailer does not match the contents.
    #[error("ltx file checksum mismatch: trailer says 0x{expected}, contents give 0x{actual}")]
    FileChecksumMismatch {
        /// The checksum stored in the trailer.
        expected: Checksum,
        /// The checksum computed from the header, page block and post-apply checksum.
        actual: Checksum,
    },

    /// A snapshot's post-apply checksum does not match the database checksum
    /// of the pages it contains.
    #[error(
        "ltx snapshot post-apply checksum mismatch: trailer says 0x{expected}, the snapshot's pages give 0x{actual}"
    )]
    PostApplyChecksumMismatch {
        /// The post-apply checksum stored in (or passed for) the trailer.
        expected: Checksum,
        /// The database checksum computed from the snapshot's pages.
        actual: Checksum,
    },

    /// Bytes follow the trailer, which must be the last thing in a file.
    #[error("ltx file has unexpected data after the trailer at byte offset {offset}")]
    TrailingData {
        /// The byte offset of the first unexpected byte.
        offset: u64,
    },

    /// The input ended early.
    #[error("ltx data truncated at byte offset {offset} while reading {what}")]
    Truncated {
        /// The byte offset at which the input ended.
        offset: u64,
        /// What was being read, e.g. "the header" or "the data of page 3".
        what: String,
    },

    /// The underlying reader or writer failed.
    #[error("I/O error while {what}: {source}")]
    Io {
        /// What was being done, e.g. "reading the ltx trailer".
        what: String,
        /// The error reported by the reader or writer.
        #[source]
        source: io::Error,
    },

    /// A file name is not of the form `%016x-%016x.ltx`.
    #[error("ltx file name {name:?}: {message}")]
    InvalidFilename {
        /// The name that was rejected.
        name: String,
        /// A full description of the problem.
        message: String,
    },

    /// A compaction would hold more distinct pages than its caller allows.
    #[error("compaction would hold more than {limit} distinct pages")]
    TooManyPages {
        /// The caller's bound.
        limit: usize,
    },

    /// A caller passed an argument that cannot be valid, or called a method
    /// in the wrong state (for example, encoding a page after `finish`).
    #[error("ltx: {0}")]
    InvalidArgument(String),
}

impl LtxError {
    /// Builds an [`LtxError::Io`] from an I/O error and a description of what was being done.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        LtxError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Formats the location prefix of an [`LtxError::InvalidPageBlock`] message.
fn describe_page_block_offset(offset: u64, compressed: bool) -> String {
    if compressed {
        format!("page block at decompressed byte offset {offset}")
    } else {
        format!("page block at byte offset {offset}")
    }
}
