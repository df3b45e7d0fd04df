//! Streaming LTX encoder.

use std::io::{self, Write};

use lz4_flex::frame::{BlockSize, FrameEncoder, FrameInfo};

use super::checksum::{Checksum, Crc64Digest, DatabaseChecksum, crc64_digest};
use super::error::LtxError;
use super::header::{HEADER_SIZE, Header, PAGE_HEADER_SIZE, Trailer, validate_post_apply_checksum};
use super::pages::PageSequence;

/// Where the page block goes: straight to the writer, or through an LZ4 frame.
enum Sink<W: Write> {
    Plain(W),
    Lz4(Box<FrameEncoder<W>>),
}

impl<W: Write> Sink<W> {
    /// Writes page-block bytes (compressing them if needed).
    fn write_block(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::Plain(w) => w.write_all(buf),
            Sink::Lz4(z) => z.write_all(buf),
        }
    }

    /// Ends the page block, closing the LZ4 frame if there is one.
    fn end_block(&mut self) -> io::Result<()> {
        match self {
            Sink::Plain(_) => Ok(()),
            Sink::Lz4(z) => z.try_finish().map_err(io::Error::from),
        }
    }

    /// Returns the underlying writer, for bytes outside the page block.
    fn raw(&mut self) -> &mut W {
        match self {
            Sink::Plain(w) => w,
            Sink::Lz4(z) => z.get_mut(),
        }
    }

    fn into_inner(self) -> W {
        match self {
            Sink::Plain(w) => w,
            Sink::Lz4(z) => z.into_inner(),
        }
    }
}

/// Where the encoder is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Pages may be encoded.
    Pages,
    /// The trailer has been written.
    Finished,
    /// An I/O error happened; the output is incomplete and nothing more may be written.
    Failed,
}

/// Writes one LTX file to a [`Write`], page by page.
///
/// [`Encoder::new`] validates and writes the header, [`Encoder::encode_page`]
/// appends pages in strictly increasing page-number order, and
/// [`Encoder::finish`] writes the page-block terminator and the trailer.  The
/// file checksum is computed while streaming, so nothing but the LZ4 frame
/// encoder's own block buffer is held in memory.
///
/// Every rule the decoder enforces is also enforced here, so an encoder never
/// produces a file its own decoder rejects.  Rule violations (bad page number,
/// wrong page length, wrong post-apply checksum) write nothing and leave the
/// encoder usable; an I/O error leaves it unusable.
///
/// The writer receives many small writes; wrap files in a `BufWriter`.
pub struct Encoder<W: Write> {
    sink: Sink<W>,
    header: Header,
    digest: Crc64Digest,
    pages: PageSequence,
    /// Bytes of uncompressed page block written so far.
    block_len: u64,
    /// The database checksum of the pages written, kept for snapshots only,
    /// where it must equal the post-apply checksum.
    snapshot_checksum: Option<DatabaseChecksum>,
    state: State,
    trailer: Option<Trailer>,
}

impl<W: Write> Encoder<W> {
    /// Validates `header` and writes it to `writer`.
    ///
    /// If the header has [`FLAG_COMPRESS_LZ4`](super::FLAG_COMPRESS_LZ4) set,
    /// the page block is written as one LZ4 frame of 64 KiB blocks, without
    /// LZ4's own content checksum: the LTX file checksum already covers every
    /// uncompressed byte, so a second checksum would only cost time on both ends.
    pub fn new(mut writer: W, header: Header) -> Result<Self, LtxError> {
        header.validate()?;
        let bytes = header.encode();
        writer
            .write_all(&bytes)
            .map_err(|e| LtxError::io("writing the ltx header", e))?;
        let mut digest = crc64_digest();
        digest.update(&bytes);
        let sink = if header.is_compressed() {
            let info = FrameInfo::new().block_size(BlockSize::Max64KB);
            Sink::Lz4(Box::new(FrameEncoder::with_frame_info(info, writer)))
        } else {
            Sink::Plain(writer)
        };
        let snapshot_checksum = if header.is_snapshot() {
            Some(DatabaseChecksum::new(header.page_size)?)
        } else {
            None
        };
        Ok(Encoder {
            sink,
            pages: PageSequence::new(&header),
            header,
            digest,
            block_len: 0,
            snapshot_checksum,
            state: State::Pages,
            trailer: None,
        })
    }

    /// Returns the header this encoder was created with.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Returns the number of pages encoded so far.
    pub fn page_count(&self) -> u32 {
        self.pages.count()
    }

    /// Returns the trailer once [`Encoder::finish`] has succeeded.
    pub fn trailer(&self) -> Option<Trailer> {
        self.trailer
    }

    /// Fails unless pages may still be written.
    fn check_open(&self) -> Result<(), LtxError> {
        match self.state {
            State::Pages => Ok(()),
            State::Finished => Err(LtxError::InvalidArgument(
                "encoder already finished; no more pages or trailers may be written".to_owned(),
            )),
            State::Failed => Err(LtxError::InvalidArgument(
                "encoder is unusable after an earlier I/O error".to_owned(),
            )),
        }
    }

    /// Builds a page-block error at the current position.
    fn block_error(&self, message: String) -> LtxError {
        LtxError::InvalidPageBlock {
            offset: HEADER_SIZE as u64 + self.block_len,
            compressed: self.header.is_compressed(),
            message,
        }
    }

    /// Writes page-block bytes and adds them to the file checksum.
    fn write_block(&mut self, buf: &[u8], what: &str) -> Result<(), LtxError> {
        if let Err(e) = self.sink.write_block(buf) {
            self.state = State::Failed;
            return Err(LtxError::io(what, e));
        }
        self.digest.update(buf);
        self.block_len += buf.len() as u64;
        Ok(())
    }

    /// Appends one page.
    ///
    /// `page` must be exactly the header's page size long, and `pgno` must
    /// follow the page-order rules: non-zero, greater than the previous page,
    /// not the lock page, not beyond the header's commit size, and, in a
    /// snapshot, exactly the next page of the database.
    pub fn encode_page(&mut self, pgno: u32, page: &[u8]) -> Result<(), LtxError> {
        self.check_open()?;
        if page.len() != self.header.page_size as usize {
            return Err(self.block_error(format!(
                "page {pgno} has {} bytes, but the page size is {}",
                page.len(),
                self.header.page_size
            )));
        }
        if let Err(message) = self.pages.accept(pgno) {
            return Err(self.block_error(message));
        }
        self.write_block(&pgno.to_be_bytes(), "writing an ltx page number")?;
        self.write_block(page, "writing ltx page data")?;
        if let Some(acc) = &mut self.snapshot_checksum {
            acc.add_page(pgno, page);
        }
        Ok(())
    }

    /// Ends the page block and writes the trailer, returning it.
    ///
    /// `post_apply_checksum` is the database checksum after the transaction;
    /// it must have bit 63 set (use [`Checksum::EMPTY_DATABASE`] for a deleted
    /// database).  For a snapshot it must equal the checksum of the pages
    /// written, and the snapshot must be complete.  The writer is flushed.
    pub fn finish(&mut self, post_apply_checksum: Checksum) -> Result<Trailer, LtxError> {
        self.check_open()?;
        validate_post_apply_checksum(post_apply_checksum)?;
        if let Err(message) = self.pages.finish() {
            return Err(self.block_error(message));
        }
        if let Some(acc) = &self.snapshot_checksum {
            if acc.value() != post_apply_checksum {
                return Err(LtxError::PostApplyChecksumMismatch {
                    expected: post_apply_checksum,
                    actual: acc.value(),
                });
            }
        }
        self.write_block(
            &[0u8; PAGE_HEADER_SIZE],
            "writing the ltx page block terminator",
        )?;
        if let Err(e) = self.sink.end_block() {
            self.state = State::Failed;
            return Err(LtxError::io("closing the ltx LZ4 frame", e));
        }
        let post_bytes = post_apply_checksum.0.to_be_bytes();
        let mut digest = self.digest;
        digest.update(&post_bytes);
        let trailer = Trailer {
            post_apply_checksum,
            file_checksum: Checksum(digest.finalize() | Checksum::FLAG),
        };
        let raw = self.sink.raw();
        if let Err(e) = raw.write_all(&trailer.encode()).and_then(|()| raw.flush()) {
            self.state = State::Failed;
            return Err(LtxError::io("writing the ltx trailer", e));
        }
        self.state = State::Finished;
        self.trailer = Some(trailer);
        Ok(trailer)
    }

    /// Returns the underlying writer.  Call [`Encoder::finish`] first, or the
    /// output is an incomplete file.
    pub fn into_inner(self) -> W {
        self.sink.into_inner()
    }
}

impl<W: Write> std::fmt::Debug for Encoder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("header", &self.header)
            .field("pages", &self.pages.count())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}
