//! Streaming LTX decoder.

use std::io::Read;

use lz4_flex::frame::FrameDecoder;

use super::checksum::{Checksum, Crc64Digest, DatabaseChecksum, crc64_digest};
use super::error::LtxError;
use super::header::{HEADER_SIZE, Header, PAGE_HEADER_SIZE, TRAILER_SIZE, Trailer};
use super::io_util::{CountingReader, read_full};
use super::pages::PageSequence;

/// Where the page block comes from: straight from the reader, or through an LZ4 frame.
enum Source<R: Read> {
    Plain(CountingReader<R>),
    Lz4(Box<FrameDecoder<CountingReader<R>>>),
}

impl<R: Read> Source<R> {
    /// Returns the reader that yields uncompressed page-block bytes.
    fn block(&mut self) -> &mut dyn Read {
        match self {
            Source::Plain(r) => r,
            Source::Lz4(z) => z.as_mut(),
        }
    }

    /// Returns the underlying (counting) reader, for bytes outside the page block.
    fn raw(&mut self) -> &mut CountingReader<R> {
        match self {
            Source::Plain(r) => r,
            Source::Lz4(z) => z.get_mut(),
        }
    }

    /// Returns how many bytes of the file have been read.
    fn count(&self) -> u64 {
        match self {
            Source::Plain(r) => r.count(),
            Source::Lz4(z) => z.get_ref().count(),
        }
    }

    fn into_inner(self) -> R {
        match self {
            Source::Plain(r) => r.into_inner(),
            Source::Lz4(z) => z.into_inner().into_inner(),
        }
    }
}

/// Where the decoder is in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Page records (or the terminator) come next.
    Pages,
    /// The terminator has been read; the trailer comes next.
    PagesDone,
    /// The trailer has been read and verified.
    Finished(Trailer),
    /// An error was reported; the position in the input is unknown.
    Failed,
}

/// Reads one LTX file from a [`Read`], page by page, checking every rule.
///
/// [`Decoder::new`] reads and validates the header.  [`Decoder::next_page`]
/// (or [`Decoder::next_page_into`]) returns pages in file order until the
/// page-block terminator, and [`Decoder::finish`] reads the trailer, verifies
/// the file checksum (and, for a snapshot, that the post-apply checksum matches
/// the pages), and checks that nothing follows the trailer.
///
/// A page returned by `next_page` has passed the page-order rules but is
/// covered by the file checksum only once `finish` succeeds, so callers must
/// not treat the data as trustworthy (for example, make it visible to readers)
/// before then.
///
/// After any error the decoder stops: further calls report that an earlier
/// error happened.  The reader receives many small reads; wrap files in a
/// `BufReader`.  Because `finish` checks for end of input, the reader must end
/// where the file ends (use [`Read::take`] to decode a file embedded in a
/// longer stream).
pub struct Decoder<R: Read> {
    source: Source<R>,
    header: Header,
    digest: Crc64Digest,
    pages: PageSequence,
    /// Bytes of uncompressed page block read so far.
    block_len: u64,
    /// The database checksum of the pages read, kept for snapshots only,
    /// where it must equal the post-apply checksum.
    snapshot_checksum: Option<DatabaseChecksum>,
    state: State,
}

impl<R: Read> Decoder<R> {
    /// Reads and validates the header.
    pub fn new(reader: R) -> Result<Self, LtxError> {
        let mut raw = CountingReader::new(reader, 0);
        let mut bytes = [0u8; HEADER_SIZE];
        let n = read_full(&mut raw, &mut bytes)
            .map_err(|e| LtxError::io("reading the ltx header", e))?;
        if n < HEADER_SIZE {
            return Err(LtxError::Truncated {
                offset: n as u64,
                what: format!("the {HEADER_SIZE}-byte header"),
            });
        }
        let header = Header::decode(&bytes)?;
        let mut digest = crc64_digest();
        digest.update(&bytes);
        let source = if header.is_compressed() {
            Source::Lz4(Box::new(FrameDecoder::new(raw)))
        } else {
            Source::Plain(raw)
        };
        let snapshot_checksum = if header.is_snapshot() {
            Some(DatabaseChecksum::new(header.page_size)?)
        } else {
            None
        };
        Ok(Decoder {
            source,
            pages: PageSequence::new(&header),
            header,
            digest,
            block_len: 0,
            snapshot_checksum,
            state: State::Pages,
        })
    }

    /// Returns the validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Returns the number of pages decoded so far.
    pub fn page_count(&self) -> u32 {
        self.pages.count()
    }

    /// Returns how many bytes have been read from the underlying reader.
    pub fn bytes_read(&self) -> u64 {
        self.source.count()
    }

    /// Returns the next page as `(page number, page bytes)`, or `None` after
    /// the page-block terminator.
    pub fn next_page(&mut self) -> Result<Option<(u32, Vec<u8>)>, LtxError> {
        match self.state {
            State::Pages => {}
            State::PagesDone | State::Finished(_) => return Ok(None),
            State::Failed => return Err(failed_error()),
        }
        let mut page = vec![0u8; self.header.page_size as usize];
        Ok(self.next_page_into(&mut page)?.map(|pgno| (pgno, page)))
    }

    /// Reads the next page into `page`, which must be exactly the page size
    /// long, and returns its page number, or `None` after the page-block
    /// terminator (in which case `page` is left untouched).
    pub fn next_page_into(&mut self, page: &mut [u8]) -> Result<Option<u32>, LtxError> {
        match self.state {
            State::Pages => {}
            State::PagesDone | State::Finished(_) => return Ok(None),
            State::Failed => return Err(failed_error()),
        }
        if page.len() != self.header.page_size as usize {
            return Err(LtxError::InvalidArgument(format!(
                "page buffer has {} bytes, but the page size is {}",
                page.len(),
                self.header.page_size
            )));
        }
        let result = self.read_record(page);
        if result.is_err() {
            self.state = State::Failed;
        }
        result
    }

    /// Reads the trailer and verifies the whole file, returning the trailer.
    ///
    /// Any pages not yet read are read (and checked) first.  This verifies the
    /// file checksum, the trailer's fields, a snapshot's post-apply checksum,
    /// and that the input ends right after the trailer.  Calling it again
    /// after success returns the same trailer.
    pub fn finish(&mut self) -> Result<Trailer, LtxError> {
        match self.state {
            State::Pages => {
                let mut page = vec![0u8; self.header.page_size as usize];
                while self.next_page_into(&mut page)?.is_some() {}
            }
            State::PagesDone => {}
            State::Finished(trailer) => return Ok(trailer),
            State::Failed => return Err(failed_error()),
        }
        match self.read_trailer() {
            Ok(trailer) => {
                self.state = State::Finished(trailer);
                Ok(trailer)
            }
            Err(e) => {
                self.state = State::Failed;
                Err(e)
            }
        }
    }

    /// Returns the underlying reader.
    pub fn into_inner(self) -> R {
        self.source.into_inner()
    }

    /// Builds a page-block error at uncompressed page-block position `block_pos`.
    fn block_error(&self, block_pos: u64, message: String) -> LtxError {
        LtxError::InvalidPageBlock {
            offset: HEADER_SIZE as u64 + block_pos,
            compressed: self.header.is_compressed(),
            message,
        }
    }

    /// Reads exactly `buf.len()` page-block bytes and adds them to the file checksum.
    /// `what` names the bytes for an error message; it runs only on an error.
    fn read_block(&mut self, buf: &mut [u8], what: impl Fn() -> String) -> Result<(), LtxError> {
        let compressed = self.header.is_compressed();
        match read_full(self.source.block(), buf) {
            Ok(n) if n == buf.len() => {
                self.digest.update(buf);
                self.block_len += buf.len() as u64;
                Ok(())
            }
            Ok(n) if compressed => Err(self.block_error(
                self.block_len + n as u64,
                format!("the LZ4 frame or the file ended while reading {}", what()),
            )),
            Ok(n) => Err(LtxError::Truncated {
                offset: HEADER_SIZE as u64 + self.block_len + n as u64,
                what: what(),
            }),
            Err(source) if compressed => Err(LtxError::Lz4 {
                offset: self.source.count(),
                source,
            }),
            Err(source) => Err(LtxError::io(format!("reading {}", what()), source)),
        }
    }

    /// Reads one page record, or the terminator.
    fn read_record(&mut self, page: &mut [u8]) -> Result<Option<u32>, LtxError> {
        let record_pos = self.block_len;
        let mut pgno_bytes = [0u8; PAGE_HEADER_SIZE];
        let record = self.pages.count() + 1;
        self.read_block(&mut pgno_bytes, || {
            format!("the page number of page record {record} (or the page block terminator)")
        })?;
        let pgno = u32::from_be_bytes(pgno_bytes);
        if pgno == 0 {
            self.end_page_block(record_pos)?;
            return Ok(None);
        }
        if let Err(message) = self.pages.accept(pgno) {
            return Err(self.block_error(record_pos, message));
        }
        self.read_block(page, || format!("the data of page {pgno}"))?;
        if let Some(acc) = &mut self.snapshot_checksum {
            acc.add_page(pgno, page);
        }
        Ok(Some(pgno))
    }

    /// Handles the page-block terminator found at `terminator_pos`.
    fn end_page_block(&mut self, terminator_pos: u64) -> Result<(), LtxError> {
        if self.header.is_compressed() {
            // The LZ4 frame must end exactly at the terminator.  Reading one
            // more byte consumes the frame's end mark (and verifies its content
            // checksum); getting a byte means the frame holds extra data.
            let mut probe = [0u8; 1];
            match read_full(self.source.block(), &mut probe) {
                Ok(0) => {}
                Ok(_) => {
                    return Err(self.block_error(
                        self.block_len,
                        "the LZ4 frame holds more data after the page block terminator".to_owned(),
                    ));
                }
                Err(source) => {
                    return Err(LtxError::Lz4 {
                        offset: self.source.count(),
                        source,
                    });
                }
            }
        }
        if let Err(message) = self.pages.finish() {
            return Err(self.block_error(terminator_pos, message));
        }
        self.state = State::PagesDone;
        Ok(())
    }

    /// Reads and verifies the trailer, then checks for end of input.
    fn read_trailer(&mut self) -> Result<Trailer, LtxError> {
        let raw = self.source.raw();
        let start = raw.count();
        let mut bytes = [0u8; TRAILER_SIZE];
        let n =
            read_full(raw, &mut bytes).map_err(|e| LtxError::io("reading the ltx trailer", e))?;
        if n < TRAILER_SIZE {
            return Err(LtxError::Truncated {
                offset: start + n as u64,
                what: format!("the {TRAILER_SIZE}-byte trailer"),
            });
        }
        let trailer = Trailer::from_array(&bytes);
        let mut digest = self.digest;
        digest.update(&trailer.post_apply_checksum.0.to_be_bytes());
        let actual = Checksum(digest.finalize() | Checksum::FLAG);
        if actual != trailer.file_checksum {
            return Err(LtxError::FileChecksumMismatch {
                expected: trailer.file_checksum,
                actual,
            });
        }
        trailer.validate()?;
        if let Some(acc) = &self.snapshot_checksum {
            if acc.value() != trailer.post_apply_checksum {
                return Err(LtxError::PostApplyChecksumMismatch {
                    expected: trailer.post_apply_checksum,
                    actual: acc.value(),
                });
            }
        }
        let raw = self.source.raw();
        let end = raw.count();
        let mut probe = [0u8; 1];
        let n = read_full(raw, &mut probe)
            .map_err(|e| LtxError::io("checking for data after the ltx trailer", e))?;
        if n != 0 {
            return Err(LtxError::TrailingData { offset: end });
        }
        Ok(trailer)
    }
}

/// The error returned by every call after a decoder has reported an error.
fn failed_error() -> LtxError {
    LtxError::InvalidArgument(
        "decoder stopped after an earlier error; the input position is unknown".to_owned(),
    )
}

impl<R: Read> std::fmt::Debug for Decoder<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("header", &self.header)
            .field("pages", &self.pages.count())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}
