//! Compaction: merging a run of consecutive LTX files into one.
//!
//! Retention keeps a database's change-set log short by replacing its oldest
//! files with a single file that has the same effect, so the log stays
//! replayable from its start.  [`compact`] reads the run of files, checks that
//! they form an unbroken chain, and writes one LTX file covering the whole
//! transaction range.
//!
//! # Invariants
//!
//! * **Same result as sequential application.**  Applying the output to a
//!   database gives byte-for-byte the database that applying the inputs one by
//!   one gives, provided the database is the one the first input applies to
//!   (its checksum equals the first input's pre-apply checksum).  Each page
//!   carries the content of the last input that wrote it; pages beyond the
//!   final commit size are dropped; and a page that some input truncated away
//!   and no later input wrote again is stored as zeros, because applying the
//!   inputs one by one truncates the file and then extends it with zeros.
//!   (SQLite writes every page it adds to a database, so that last case does
//!   not arise from SQLite itself; it is handled so that compaction stays
//!   exact whatever the inputs are.)
//! * **Unbroken chains only.**  Every input after the first must start at the
//!   TXID after the previous input's last one, must have a pre-apply checksum
//!   equal to the previous input's post-apply checksum, and must have the same
//!   page size.  A snapshot (minimum TXID 1) is exempt from those rules because
//!   it replaces the whole database: it may appear anywhere in the run, may
//!   change the page size, and only has to end past the previous input's last
//!   TXID.  Anything else is refused with an error naming the TXIDs of both
//!   files.
//! * **Header fields.**  The output spans the first input's minimum TXID to
//!   the last input's maximum TXID, carries the first input's pre-apply
//!   checksum (zero when the first input is a snapshot, in which case the
//!   output is a snapshot too), and the last input's commit size, timestamp,
//!   node ID and post-apply checksum.  The WAL fields are zero, because the
//!   output does not correspond to one range of one WAL, and the only flag is
//!   LZ4 compression when asked for.
//! * **Full outputs are checked.**  When the run contains a snapshot, the
//!   output holds every page of the final database (`1..=commit` except the
//!   lock page).  If that snapshot is not the first input, the output is still
//!   not a snapshot (it starts where the run does), yet it may have a different
//!   page size from the database it applies to; an applier has to accept that,
//!   which is safe because the output rewrites every page.  That is verified before anything is written, and the output's
//!   pages are checked against the last post-apply checksum (by the
//!   [`Encoder`] for a snapshot, here otherwise), which catches a chain whose
//!   checksums do not describe its pages.
//! * **Inputs are verified before output.**  Every input is decoded to its end
//!   and verified with [`Decoder::finish`] (file checksum, page order, snapshot
//!   completeness) before the first byte of output is written.  A bad input
//!   therefore leaves `out` untouched.  An I/O error while writing, or a
//!   post-apply checksum mismatch found while encoding a full output, leaves
//!   partial output behind (a file with no valid trailer); callers write to a
//!   temporary file and rename it only on success, so that is acceptable.
//!
//! # Memory
//!
//! Compaction keeps the latest version of every page the run touched in memory
//! (one page per distinct page number still inside the database), and reads
//! the inputs one at a time, so memory use is proportional to the number of
//! distinct pages touched, not to the total size of the inputs.  [`compact`]
//! therefore holds the whole database for a run that starts with a snapshot;
//! [`compact_onto_snapshot`] does not: it reads that snapshot twice and streams
//! it into the output, keeping only the pages the later inputs touched.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::io::{BufReader, BufWriter, Read, Write};

use super::checksum::DatabaseChecksum;
use super::decoder::Decoder;
use super::encoder::Encoder;
use super::error::LtxError;
use super::header::{FLAG_COMPRESS_LZ4, Header, Trailer, lock_page_number};

/// Compacts a run of consecutive LTX files into one, written to `out`, and
/// returns the header of the output.
///
/// `inputs` are complete LTX files in TXID order; each reader must end where
/// its file ends.  They are read one after another through a buffer, so plain
/// [`File`](std::fs::File)s are fine.  The output is LZ4-compressed when
/// `compress` is true, whether or not the inputs were.  See the
/// module documentation of `ltx::compact` for the rules the inputs must follow, how the
/// output is built, and the memory it needs.
///
/// # Errors
///
/// * [`LtxError::InvalidArgument`] when `inputs` is empty;
/// * [`LtxError::InvalidHeader`] for field `"min_txid"`, `"max_txid"`,
///   `"pre_apply_checksum"` or `"page_size"` when an input does not follow the
///   previous one; the message names both files' TXID ranges;
/// * any decoding error of an input.  Errors whose message is text (header,
///   trailer, page block, truncation, I/O) get the input's position and TXID
///   range appended to the message; the others are returned unchanged;
/// * [`LtxError::PostApplyChecksumMismatch`] when the output contains the
///   whole database and its pages do not match the last post-apply checksum;
/// * [`LtxError::Io`] when writing to `out` fails.
pub fn compact<R: Read>(
    inputs: impl IntoIterator<Item = R>,
    compress: bool,
    out: impl Write,
) -> Result<Header, LtxError> {
    compact_within(inputs, compress, usize::MAX, out)
}

/// [`compact`], refusing with [`LtxError::TooManyPages`] as soon as the run
/// touched more than `max_pages` distinct pages, which bounds its memory.
/// Nothing is written to `out` then.
///
/// # Errors
///
/// Those of [`compact`], and [`LtxError::TooManyPages`].
pub fn compact_within<R: Read>(
    inputs: impl IntoIterator<Item = R>,
    compress: bool,
    max_pages: usize,
    out: impl Write,
) -> Result<Header, LtxError> {
    let chain = read_chain(inputs, max_pages)?;
    write_output(&chain, compress, out)
}

/// Everything [`compact`] learns from reading and verifying the inputs.
#[derive(Debug)]
struct Chain {
    /// The header of the first input.
    first: Header,
    /// The header of the last input read so far.
    last: Header,
    /// The trailer of the last input read so far.
    last_trailer: Trailer,
    /// Whether some input was a snapshot, so that `pages` holds every page of
    /// the database from that snapshot on.
    full: bool,
    /// The smallest commit size of any input since the start of the run (or
    /// since the last snapshot).  Applying the inputs one by one truncates the
    /// database to this size at some point, so every page above it that is not
    /// in `pages` reads as zeros afterwards.
    floor: u32,
    /// The latest content of every page written since the start of the run
    /// (or since the last snapshot) and not truncated away since.
    pages: BTreeMap<u32, Vec<u8>>,
}

impl Chain {
    /// Starts a chain (or restarts it, for a snapshot) at an input with `header`.
    fn start(header: Header, full: bool) -> Chain {
        Chain {
            first: header,
            last: header,
            last_trailer: Trailer::default(),
            full,
            floor: header.commit,
            pages: BTreeMap::new(),
        }
    }
}

/// Describes input number `index` (1-based) for error messages.
fn describe_input(index: usize, header: Option<&Header>) -> String {
    match header {
        Some(h) => format!(
            "compaction input {index} (TXIDs {}-{})",
            h.min_txid, h.max_txid
        ),
        None => format!("compaction input {index}"),
    }
}

/// Appends the identity of the input at fault to a decoding error's message.
///
/// Only variants that carry a message can be annotated; the others are
/// returned unchanged so that callers matching on them still see them.
fn in_input(error: LtxError, index: usize, header: Option<&Header>) -> LtxError {
    let context = describe_input(index, header);
    match error {
        LtxError::InvalidHeader { field, message } => LtxError::InvalidHeader {
            field,
            message: format!("{message} (in {context})"),
        },
        LtxError::InvalidTrailer { field, message } => LtxError::InvalidTrailer {
            field,
            message: format!("{message} (in {context})"),
        },
        LtxError::InvalidPageBlock {
            offset,
            compressed,
            message,
        } => LtxError::InvalidPageBlock {
            offset,
            compressed,
            message: format!("{message} (in {context})"),
        },
        LtxError::Truncated { offset, what } => LtxError::Truncated {
            offset,
            what: format!("{what} of {context}"),
        },
        LtxError::Io { what, source } => LtxError::Io {
            what: format!("{what} of {context}"),
            source,
        },
        other => other,
    }
}

/// Checks that the input with `next` follows the chain read so far, where
/// `index` is the input's 1-based position.
fn check_follows(chain: &Chain, next: &Header, index: usize) -> Result<(), LtxError> {
    let prev = &chain.last;
    let prev_desc = describe_input(index - 1, Some(prev));
    let next_desc = describe_input(index, Some(next));
    if next.is_snapshot() {
        // A snapshot replaces the whole database, so only its position in the
        // log matters: it must move the log forward.
        if next.max_txid <= prev.max_txid {
            return Err(LtxError::InvalidHeader {
                field: "max_txid",
                message: format!(
                    "{next_desc} is a snapshot ending at TXID {}, which does not come after {prev_desc}",
                    next.max_txid
                ),
            });
        }
        return Ok(());
    }
    let expected_min = prev.max_txid.0.checked_add(1);
    if expected_min != Some(next.min_txid.0) {
        return Err(LtxError::InvalidHeader {
            field: "min_txid",
            message: format!(
                "{next_desc} does not follow {prev_desc}: its minimum TXID should be the one after {}",
                prev.max_txid
            ),
        });
    }
    let post = chain.last_trailer.post_apply_checksum;
    if next.pre_apply_checksum != post {
        return Err(LtxError::InvalidHeader {
            field: "pre_apply_checksum",
            message: format!(
                "{next_desc} does not follow {prev_desc}: its pre-apply checksum 0x{} differs from the previous post-apply checksum 0x{post}",
                next.pre_apply_checksum
            ),
        });
    }
    Ok(())
}

/// Reads and verifies every input, folding their pages into one [`Chain`].
fn read_chain<R: Read>(
    inputs: impl IntoIterator<Item = R>,
    max_pages: usize,
) -> Result<Chain, LtxError> {
    let mut chain: Option<Chain> = None;
    for (i, reader) in inputs.into_iter().enumerate() {
        fold_input(&mut chain, i + 1, reader)?;
        if chain
            .as_ref()
            .is_some_and(|chain| chain.pages.len() > max_pages)
        {
            return Err(LtxError::TooManyPages { limit: max_pages });
        }
    }
    chain.ok_or_else(|| {
        LtxError::InvalidArgument("compaction needs at least one input file".to_owned())
    })
}

/// Reads and verifies input number `index` (1-based), folding its pages into
/// `chain` (starting it with the first input); says whether the input replaced
/// everything before it: a snapshot, or a change set that changes the page
/// size (which must then hold every page, as capture writes it).
fn fold_input<R: Read>(
    chain: &mut Option<Chain>,
    index: usize,
    reader: R,
) -> Result<bool, LtxError> {
    let mut decoder = Decoder::new(BufReader::new(reader)).map_err(|e| in_input(e, index, None))?;
    let header = *decoder.header();
    let mut resized_from = None;
    let chain = match chain.as_mut() {
        None => chain.insert(Chain::start(header, header.is_snapshot())),
        Some(c) => {
            check_follows(c, &header, index)?;
            if header.page_size != c.last.page_size && !header.is_snapshot() {
                resized_from = Some(c.last.page_size);
            }
            if header.is_snapshot() || resized_from.is_some() {
                // Such an input in the middle of the run replaces everything
                // before it, but the output still starts where the run does.
                let first = c.first;
                *c = Chain::start(header, true);
                c.first = first;
            } else {
                c.floor = c.floor.min(header.commit);
            }
            c
        }
    };
    read_pages(&mut decoder, &mut chain.pages).map_err(|e| in_input(e, index, Some(&header)))?;
    if let Some(previous) = resized_from
        && check_complete(&chain.pages, header.commit, header.commit, header.page_size).is_err()
    {
        return Err(LtxError::InvalidHeader {
            field: "page_size",
            message: format!(
                "{} changes the page size from {previous} to {} without holding every page",
                describe_input(index, Some(&header)),
                header.page_size
            ),
        });
    }
    let trailer = decoder
        .finish()
        .map_err(|e| in_input(e, index, Some(&header)))?;
    // The input leaves the database `commit` pages long, so anything
    // written earlier beyond that is gone.
    if let Some(beyond) = header.commit.checked_add(1) {
        drop(chain.pages.split_off(&beyond));
    }
    chain.last = header;
    chain.last_trailer = trailer;
    Ok(header.is_snapshot() || resized_from.is_some())
}

/// Compacts a run whose first input is a snapshot, like [`compact`], without
/// holding the snapshot's pages: `open_base` opens the snapshot, which is read
/// twice (verified to its end first, then streamed into the output under the
/// pages of the later inputs), so memory is proportional to the pages the
/// `rest` of the run touched, not to the database. The output is the same,
/// byte for byte, as [`compact`]'s. It is written only after every input was
/// verified; the second reading of the snapshot must give the same pages, or
/// the output is left incomplete (callers write to a temporary file).
///
/// # Errors
///
/// Those of [`compact`], and [`LtxError::InvalidArgument`] when the first
/// input is not a snapshot.
pub fn compact_onto_snapshot<S: Read, R: Read>(
    open_base: impl FnMut() -> std::io::Result<S>,
    rest: impl IntoIterator<Item = R>,
    compress: bool,
    out: impl Write,
) -> Result<Header, LtxError> {
    let options = OntoSnapshot {
        compress,
        ..OntoSnapshot::default()
    };
    compact_onto_snapshot_with(open_base, rest, options, out)
}

/// How [`compact_onto_snapshot_with`] compacts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OntoSnapshot {
    /// LZ4-compress the output's page block.
    pub compress: bool,
    /// The output's node ID is at least this (the lease epoch a snapshot is
    /// sent under).
    pub min_node_id: u64,
    /// The base's post-apply checksum, when the caller knows the base is intact
    /// (a log it wrote itself): the base is then read once, and its pages are
    /// checked as the output is written, by the output's post-apply checksum,
    /// instead of before. A damaged base then fails the compaction at its end
    /// with the output incomplete, as the second reading may anyway.
    pub trusted_base: Option<super::Checksum>,
}

/// [`compact_onto_snapshot`] with [`OntoSnapshot`]'s options.
///
/// # Errors
///
/// Those of [`compact_onto_snapshot`].
pub fn compact_onto_snapshot_with<S: Read, R: Read>(
    mut open_base: impl FnMut() -> std::io::Result<S>,
    rest: impl IntoIterator<Item = R>,
    options: OntoSnapshot,
    out: impl Write,
) -> Result<Header, LtxError> {
    let compress = options.compress;
    let open = |open_base: &mut dyn FnMut() -> std::io::Result<S>| {
        open_base()
            .map_err(|e| in_input(LtxError::io("opening", e), 1, None))
            .and_then(|reader| {
                Decoder::new(BufReader::new(reader)).map_err(|e| in_input(e, 1, None))
            })
    };
    let mut base = open(&mut open_base)?;
    let base_header = *base.header();
    if !base_header.is_snapshot() {
        return Err(LtxError::InvalidArgument(format!(
            "compaction onto a snapshot needs a snapshot first, not {}",
            describe_input(1, Some(&base_header))
        )));
    }
    let trailer = match options.trusted_base {
        Some(post_apply_checksum) => Trailer {
            post_apply_checksum,
            ..Trailer::default()
        },
        None => base
            .finish()
            .map_err(|e| in_input(e, 1, Some(&base_header)))?,
    };
    let mut chain = Chain::start(base_header, true);
    chain.last_trailer = trailer;
    let mut chain = Some(chain);
    let mut base_replaced = false;
    for (i, reader) in rest.into_iter().enumerate() {
        base_replaced |= fold_input(&mut chain, i + 2, reader)?;
    }
    let Some(mut chain) = chain else {
        return Err(LtxError::InvalidArgument(
            "compaction lost its chain; this is a bug in compaction".to_owned(),
        ));
    };
    chain.last.node_id = chain.last.node_id.max(options.min_node_id);
    if base_replaced {
        // A later input holds every page since, all of them in `chain`.
        return write_output(&chain, compress, out);
    }
    let base = match options.trusted_base {
        // Not read yet: its pages are still ahead of the decoder.
        Some(_) => base,
        None => open(&mut open_base)?,
    };
    write_output_onto(&chain, base, compress, out)
}

/// Reads every page of `decoder` into `pages`, replacing older versions.
fn read_pages<R: Read>(
    decoder: &mut Decoder<R>,
    pages: &mut BTreeMap<u32, Vec<u8>>,
) -> Result<(), LtxError> {
    let mut buf = vec![0u8; decoder.header().page_size as usize];
    while let Some(pgno) = decoder.next_page_into(&mut buf)? {
        match pages.entry(pgno) {
            // `clone_from` reuses the existing allocation.
            Entry::Occupied(mut e) => e.get_mut().clone_from(&buf),
            Entry::Vacant(e) => {
                e.insert(buf.clone());
            }
        }
    }
    Ok(())
}

/// Checks that a full output has every page `1..=commit` except the lock
/// page: pages up to `floor` must be in `pages`, and pages above it are
/// filled with zeros when missing.
///
/// A valid chain always passes; this guards against bugs in the folding.
fn check_complete(
    pages: &BTreeMap<u32, Vec<u8>>,
    floor: u32,
    commit: u32,
    page_size: u32,
) -> Result<(), LtxError> {
    let lock = lock_page_number(page_size);
    let limit = floor.min(commit);
    let mut expected: u64 = 1;
    let mut keys = pages.range(..=limit).map(|(pgno, _)| u64::from(*pgno));
    loop {
        if expected == u64::from(lock) {
            expected += 1;
        }
        if expected > u64::from(limit) {
            return Ok(());
        }
        if keys.next() != Some(expected) {
            return Err(LtxError::InvalidArgument(format!(
                "compaction output would contain the whole database (commit {commit}) but lacks page {expected}; this is a bug in compaction"
            )));
        }
        expected += 1;
    }
}

/// The header of the compacted file for `chain`.
fn output_header(chain: &Chain, compress: bool) -> Header {
    let first = &chain.first;
    let last = &chain.last;
    Header {
        flags: if compress { FLAG_COMPRESS_LZ4 } else { 0 },
        page_size: last.page_size,
        commit: last.commit,
        min_txid: first.min_txid,
        max_txid: last.max_txid,
        timestamp: last.timestamp,
        pre_apply_checksum: first.pre_apply_checksum,
        wal_offset: 0,
        wal_size: 0,
        wal_salt1: 0,
        wal_salt2: 0,
        node_id: last.node_id,
    }
}

/// Writes the compacted file for `chain` and returns its header.
fn write_output(chain: &Chain, compress: bool, out: impl Write) -> Result<Header, LtxError> {
    let header = output_header(chain, compress);
    if chain.full {
        check_complete(&chain.pages, chain.floor, header.commit, header.page_size)?;
    }
    // The encoder checks a snapshot's pages against its post-apply checksum by
    // itself; a full output that is not a snapshot is checked here.
    let mut full_checksum = if chain.full && !header.is_snapshot() {
        Some(DatabaseChecksum::new(header.page_size)?)
    } else {
        None
    };
    let mut encoder = Encoder::new(BufWriter::new(out), header)?;
    let lock = lock_page_number(header.page_size);
    let zeros = vec![0u8; header.page_size as usize];
    let mut emit = |pgno: u32, page: &[u8]| -> Result<(), LtxError> {
        encoder.encode_page(pgno, page)?;
        if let Some(acc) = &mut full_checksum {
            acc.add_page(pgno, page);
        }
        Ok(())
    };
    // Pages above the floor that no input wrote since the truncation read as
    // zeros after sequential application; emit them between the stored pages.
    let mut next_zero = chain.floor.saturating_add(1);
    for (&pgno, page) in &chain.pages {
        while next_zero < pgno {
            if next_zero != lock {
                emit(next_zero, &zeros)?;
            }
            next_zero += 1;
        }
        emit(pgno, page)?;
        next_zero = next_zero.max(pgno.saturating_add(1));
    }
    // `next_zero` is at most `commit + 1` unless the floor was `u32::MAX`, in
    // which case the range below is empty.
    for pgno in next_zero..=header.commit {
        if pgno != lock {
            emit(pgno, &zeros)?;
        }
    }
    let post_apply = chain.last_trailer.post_apply_checksum;
    if let Some(acc) = &full_checksum {
        if acc.value() != post_apply {
            return Err(LtxError::PostApplyChecksumMismatch {
                expected: post_apply,
                actual: acc.value(),
            });
        }
    }
    encoder.finish(post_apply)?;
    Ok(header)
}

/// Writes the compacted file for `chain`, whose first input is the snapshot
/// `base` (its pages not in `chain`), and returns its header. Every page up to
/// the chain's floor comes from `chain` or else `base`, every page above it from
/// `chain` or else is zeros; the output is a snapshot, which the encoder checks
/// against the last post-apply checksum.
fn write_output_onto<S: Read>(
    chain: &Chain,
    mut base: Decoder<S>,
    compress: bool,
    out: impl Write,
) -> Result<Header, LtxError> {
    let header = output_header(chain, compress);
    let page_size = header.page_size as usize;
    let lock = lock_page_number(header.page_size);
    let zeros = vec![0u8; page_size];
    let mut base_page = vec![0u8; page_size];
    let base_header = *base.header();
    let mut encoder = Encoder::new(BufWriter::new(out), header)?;
    for pgno in 1..=header.commit {
        if pgno == lock {
            continue;
        }
        let below_floor = pgno <= chain.floor;
        if below_floor {
            // The snapshot holds every page up to its commit, in order, and the
            // floor is at most its commit.
            let read = base
                .next_page_into(&mut base_page)
                .map_err(|e| in_input(e, 1, Some(&base_header)))?;
            if read != Some(pgno) {
                return Err(LtxError::InvalidArgument(format!(
                    "{} read again gave page {read:?} where page {pgno} was expected",
                    describe_input(1, Some(&base_header))
                )));
            }
        }
        let page = match chain.pages.get(&pgno) {
            Some(page) => page,
            None if below_floor => &base_page,
            None => &zeros,
        };
        encoder.encode_page(pgno, page)?;
    }
    encoder.finish(chain.last_trailer.post_apply_checksum)?;
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::super::checksum::{Checksum, checksum_database};
    use super::super::header::TxId;
    use super::*;

    const PS: u32 = 512;

    /// Encodes one uncompressed file with the given pages.
    fn file(
        (min, max): (u64, u64),
        commit: u32,
        pre: Checksum,
        pages: &[(u32, u8)],
        post: Checksum,
    ) -> Vec<u8> {
        let header = Header {
            page_size: PS,
            commit,
            min_txid: TxId(min),
            max_txid: TxId(max),
            timestamp: 1000 + max,
            pre_apply_checksum: pre,
            node_id: max,
            ..Header::default()
        };
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out, header).unwrap();
        for &(pgno, fill) in pages {
            enc.encode_page(pgno, &[fill; PS as usize]).unwrap();
        }
        enc.finish(post).unwrap();
        out
    }

    /// The checksum of a database made of pages filled with the given bytes.
    fn db_checksum(fills: &[u8]) -> Checksum {
        let image: Vec<u8> = fills.iter().flat_map(|&f| [f; PS as usize]).collect();
        checksum_database(&image[..], PS, fills.len() as u32).unwrap()
    }

    fn map(pgnos: &[u32]) -> BTreeMap<u32, Vec<u8>> {
        pgnos.iter().map(|&p| (p, Vec::new())).collect()
    }

    #[test]
    fn a_trusted_base_is_read_once_and_still_caught_when_damaged() {
        let base = file(
            (1, 1),
            3,
            Checksum(0),
            &[(1, 1), (2, 2), (3, 3)],
            db_checksum(&[1, 2, 3]),
        );
        let later = file(
            (2, 2),
            3,
            db_checksum(&[1, 2, 3]),
            &[(2, 9)],
            db_checksum(&[1, 9, 3]),
        );
        let compact_with = |base: &[u8], options: OntoSnapshot| {
            let mut opened = 0;
            let mut out = Vec::new();
            let result = compact_onto_snapshot_with(
                || {
                    opened += 1;
                    Ok(base)
                },
                [later.as_slice()],
                options,
                &mut out,
            );
            (result.map(|header| (header, out)), opened)
        };
        let (verified, opened_verified) = compact_with(&base, OntoSnapshot::default());
        let trusted_options = OntoSnapshot {
            min_node_id: 7,
            trusted_base: Some(db_checksum(&[1, 2, 3])),
            ..OntoSnapshot::default()
        };
        let (trusted, opened_trusted) = compact_with(&base, trusted_options);
        let ((verified_header, verified_bytes), (trusted_header, trusted_bytes)) =
            (verified.unwrap(), trusted.unwrap());
        assert_eq!((opened_verified, opened_trusted), (2, 1));
        assert_eq!(
            trusted_header.node_id, 7,
            "stamped with the epoch asked for"
        );
        assert_eq!(
            Header {
                node_id: 7,
                ..verified_header
            },
            trusted_header,
            "the same output but for the node ID"
        );
        assert_eq!(verified_bytes.len(), trusted_bytes.len());

        // A damaged page of a trusted base fails the compaction at its end.
        let mut damaged = base.clone();
        let at = damaged.len() - 200;
        damaged[at] ^= 0xff;
        let (result, _) = compact_with(&damaged, trusted_options);
        assert!(result.is_err(), "a damaged base went unnoticed");
    }

    #[test]
    fn check_complete_finds_the_first_missing_page() {
        check_complete(&map(&[1, 2, 3]), 3, 3, PS).unwrap();
        // Pages above the floor are zero-filled, so they need not be stored.
        check_complete(&map(&[1, 2]), 2, 5, PS).unwrap();
        let err = check_complete(&map(&[1, 3]), 3, 3, PS).unwrap_err();
        assert!(err.to_string().contains("lacks page 2"), "{err}");
        let err = check_complete(&map(&[1, 2]), 3, 3, PS).unwrap_err();
        assert!(err.to_string().contains("lacks page 3"), "{err}");
        // An empty database is complete.
        check_complete(&map(&[]), 0, 0, PS).unwrap();
    }

    #[test]
    fn check_complete_skips_the_lock_page() {
        let lock = lock_page_number(65536);
        let all: Vec<u32> = (1..=lock + 1).filter(|&p| p != lock).collect();
        check_complete(&map(&all), lock + 1, lock + 1, 65536).unwrap();
        let short: Vec<u32> = (1..lock).collect();
        check_complete(&map(&short), lock, lock, 65536).unwrap();
        let err = check_complete(&map(&short), lock + 1, lock + 1, 65536).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("lacks page {}", lock + 1)),
            "{err}"
        );
    }

    #[test]
    fn decoding_errors_name_the_input() {
        let s1 = db_checksum(&[1]);
        let snap = file((1, 1), 1, Checksum::ZERO, &[(1, 1)], s1);
        let mut bad = file((2, 2), 1, s1, &[(1, 2)], db_checksum(&[2]));
        bad.truncate(bad.len() - 3);
        let err = compact([&snap[..], &bad[..]], false, Vec::new()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LtxError::Truncated { .. }), "{err:?}");
        assert!(
            msg.contains("compaction input 2 (TXIDs 0000000000000002-0000000000000002)"),
            "{msg}"
        );

        // A header that cannot be decoded is named by position only.
        let err = compact([&snap[..], &[0u8; 10][..]], false, Vec::new()).unwrap_err();
        assert!(err.to_string().ends_with("of compaction input 2"), "{err}");
    }

    #[test]
    fn full_output_is_checked_against_the_last_post_apply_checksum() {
        let s0 = db_checksum(&[0]);
        let s3 = db_checksum(&[3]);
        let a = file((2, 2), 1, s0, &[(1, 1)], db_checksum(&[1]));
        let b = file((1, 3), 1, Checksum::ZERO, &[(1, 3)], s3);
        // The last file's post-apply checksum does not describe its page.
        let c = file((4, 4), 1, s3, &[(1, 4)], db_checksum(&[5]));
        let err = compact([&a[..], &b[..], &c[..]], false, Vec::new()).unwrap_err();
        assert!(
            matches!(err, LtxError::PostApplyChecksumMismatch { .. }),
            "{err:?}"
        );
        // Without the snapshot the output is partial and cannot be checked.
        let c = file((2, 2), 1, s0, &[(1, 4)], db_checksum(&[5]));
        compact([&c[..]], false, Vec::new()).unwrap();
    }

    #[test]
    fn empty_input_is_refused() {
        let err = compact(std::iter::empty::<&[u8]>(), false, Vec::new()).unwrap_err();
        assert!(err.to_string().contains("at least one input"), "{err}");
    }

    #[test]
    fn folding_tracks_the_floor_and_drops_truncated_pages() {
        let s1 = db_checksum(&[1, 1, 1]);
        let s2 = db_checksum(&[1]);
        let s3 = db_checksum(&[1, 0, 3]);
        let files = [
            file((1, 1), 3, Checksum::ZERO, &[(1, 1), (2, 1), (3, 1)], s1),
            file((2, 2), 1, s1, &[], s2),
            file((3, 3), 3, s2, &[(3, 3)], s3),
        ];
        let chain = read_chain(files.iter().map(|f| &f[..]), usize::MAX).unwrap();
        assert!(chain.full);
        assert_eq!(chain.floor, 1);
        assert_eq!(chain.pages.keys().copied().collect::<Vec<_>>(), [1, 3]);

        // Page 2 was truncated away and never rewritten, so it comes back as zeros.
        let mut out = Vec::new();
        let header = write_output(&chain, false, &mut out).unwrap();
        assert!(header.is_snapshot());
        let mut dec = Decoder::new(&out[..]).unwrap();
        let mut got = Vec::new();
        while let Some((pgno, page)) = dec.next_page().unwrap() {
            got.push((pgno, page[0]));
        }
        assert_eq!(got, [(1, 1), (2, 0), (3, 3)]);
        assert_eq!(dec.finish().unwrap().post_apply_checksum, s3);
    }
}
