//! Whole-file helpers behind the `ltxfs ltx verify` and `ltxfs ltx dump`
//! commands.

use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use super::checksum::page_checksum;
use super::decoder::Decoder;
use super::error::LtxError;
use super::header::{Header, Trailer, parse_filename};

/// What a successful [`verify`] or [`dump`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// The file's header.
    pub header: Header,
    /// The file's trailer (its file checksum has been verified).
    pub trailer: Trailer,
    /// How many pages the page block holds.
    pub page_count: u32,
    /// The size of the file in bytes.
    pub file_size: u64,
}

/// Decodes a whole LTX file, checking every rule and the file checksum, and
/// returns a summary of it.
pub fn verify<R: Read>(reader: R) -> Result<Summary, LtxError> {
    let mut decoder = Decoder::new(reader)?;
    let trailer = decoder.finish()?;
    Ok(Summary {
        header: *decoder.header(),
        trailer,
        page_count: decoder.page_count(),
        file_size: decoder.bytes_read(),
    })
}

/// Writes a human-readable listing of an LTX file to `out`: every header
/// field, each page number with its page checksum, and the trailer.
///
/// The file is verified as it is read.  If it is invalid, everything decoded
/// before the problem has already been written when the error is returned,
/// which shows where the damage is.
pub fn dump<R: Read, W: Write + ?Sized>(reader: R, out: &mut W) -> Result<Summary, LtxError> {
    let out_err = |e| LtxError::io("writing the ltx dump", e);
    let mut decoder = Decoder::new(reader)?;
    let h = *decoder.header();
    let flags = if h.is_compressed() { " (lz4)" } else { "" };
    let kind = if h.is_snapshot() { " (snapshot)" } else { "" };
    writeln!(out, "header").map_err(out_err)?;
    writeln!(out, "  flags               0x{:08x}{flags}", h.flags).map_err(out_err)?;
    writeln!(out, "  page size           {}", h.page_size).map_err(out_err)?;
    writeln!(out, "  commit              {}", h.commit).map_err(out_err)?;
    writeln!(out, "  min txid            {}{kind}", h.min_txid).map_err(out_err)?;
    writeln!(out, "  max txid            {}", h.max_txid).map_err(out_err)?;
    writeln!(
        out,
        "  timestamp           {} ({})",
        h.timestamp,
        format_timestamp_millis(h.timestamp)
    )
    .map_err(out_err)?;
    writeln!(out, "  pre-apply checksum  {}", h.pre_apply_checksum).map_err(out_err)?;
    writeln!(out, "  wal offset          {}", h.wal_offset).map_err(out_err)?;
    writeln!(out, "  wal size            {}", h.wal_size).map_err(out_err)?;
    writeln!(out, "  wal salt1           0x{:08x}", h.wal_salt1).map_err(out_err)?;
    writeln!(out, "  wal salt2           0x{:08x}", h.wal_salt2).map_err(out_err)?;
    writeln!(out, "  node id             {:016x}", h.node_id).map_err(out_err)?;
    writeln!(out, "pages").map_err(out_err)?;
    let mut page = vec![0u8; h.page_size as usize];
    while let Some(pgno) = decoder.next_page_into(&mut page)? {
        writeln!(
            out,
            "  pgno {pgno:<10} checksum {}",
            page_checksum(pgno, &page)
        )
        .map_err(out_err)?;
    }
    let trailer = decoder.finish()?;
    writeln!(out, "trailer").map_err(out_err)?;
    writeln!(out, "  post-apply checksum {}", trailer.post_apply_checksum).map_err(out_err)?;
    writeln!(
        out,
        "  file checksum       {} (verified)",
        trailer.file_checksum
    )
    .map_err(out_err)?;
    let summary = Summary {
        header: h,
        trailer,
        page_count: decoder.page_count(),
        file_size: decoder.bytes_read(),
    };
    writeln!(
        out,
        "{} pages, {} bytes",
        summary.page_count, summary.file_size
    )
    .map_err(out_err)?;
    Ok(summary)
}

impl fmt::Display for Summary {
    /// One line for `ltxfs ltx verify`, e.g. `ok: 0000000000000001-0000000000000003.ltx
    /// txid 1..3 (snapshot), 12 pages of 4096 bytes, commit 12, post-apply
    /// checksum 8000…` (the TXIDs after `txid` are decimal; the name is hex).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        write!(
            f,
            "ok: {} txid {}..{}{}, {} page{} of {} bytes, commit {}, post-apply checksum {}{}",
            h.filename(),
            h.min_txid.get(),
            h.max_txid.get(),
            if h.is_snapshot() { " (snapshot)" } else { "" },
            self.page_count,
            if self.page_count == 1 { "" } else { "s" },
            h.page_size,
            h.commit,
            self.trailer.post_apply_checksum,
            if h.is_compressed() { ", lz4" } else { "" },
        )
    }
}

/// Opens the LTX file at `path` and [`verify`]s it.
///
/// Errors name the field or byte offset at fault, as [`verify`]'s do; an error
/// opening or reading the file names the path.  If the file's name has the
/// canonical `%016x-%016x.ltx` form, it must match the header's TXID range
/// ([`LtxError::InvalidFilename`] otherwise); other names are not checked.
pub fn verify_file(path: &Path) -> Result<Summary, LtxError> {
    let summary = verify(open_buffered(path)?)?;
    check_filename(path, &summary.header)?;
    Ok(summary)
}

/// Opens the LTX file at `path` and [`dump`]s it to `out`.
///
/// As with [`dump`], on an error everything decoded before the problem has
/// already been written.  The file name is checked as in [`verify_file`], after
/// the listing.
pub fn dump_file(path: &Path, out: &mut dyn Write) -> Result<Summary, LtxError> {
    let summary = dump(open_buffered(path)?, out)?;
    check_filename(path, &summary.header)?;
    Ok(summary)
}

/// Opens `path` for reading behind a 64 KiB buffer.
fn open_buffered(path: &Path) -> Result<BufReader<File>, LtxError> {
    let file =
        File::open(path).map_err(|e| LtxError::io(format!("opening {}", path.display()), e))?;
    Ok(BufReader::with_capacity(1 << 16, file))
}

/// Fails if `path`'s file name is a canonical LTX name for another TXID range.
fn check_filename(path: &Path, header: &Header) -> Result<(), LtxError> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    match parse_filename(name) {
        Ok((min, max)) if (min, max) != (header.min_txid, header.max_txid) => {
            Err(LtxError::InvalidFilename {
                name: name.to_owned(),
                message: format!(
                    "names transactions {min}..{max}, but the header covers {}..{}",
                    header.min_txid, header.max_txid
                ),
            })
        }
        _ => Ok(()),
    }
}

/// Formats milliseconds since the Unix epoch as an RFC 3339 UTC timestamp with
/// millisecond precision, e.g. `2023-11-14T22:13:20.000Z`.
pub fn format_timestamp_millis(millis: u64) -> String {
    let days = millis / 86_400_000;
    let ms_of_day = millis % 86_400_000;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

/// Converts days since 1970-01-01 into a (year, month, day) civil date in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`, restricted
/// to non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of a year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_timestamp_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_timestamp_millis(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            format_timestamp_millis(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        // The largest value must not overflow.
        assert!(format_timestamp_millis(u64::MAX).ends_with('Z'));
    }
}
