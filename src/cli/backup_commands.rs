//! `ltxfs restore` and `ltxfs backup list|verify`: argument checks, a runtime
//! for the call, and what is printed. The work is in `backup`.

use std::io::IsTerminal;
use std::path::Path;

use super::{EXIT_FAILURE, EXIT_USAGE, fail};
use crate::backup::encryption::Identities;
use crate::backup::{self, BackupError, Destination, Target};
use crate::config::BackupDestination;
use crate::ltx::{TxId, format_timestamp_millis};

/// Where a command reads: the destination, and the age identity file that
/// opens encrypted objects.
pub(super) struct Source {
    /// The destination and its credentials.
    pub destination: BackupDestination,
    /// `--age-identity`, or `backup.encryption.age-identity-file`.
    pub age_identity: Option<std::path::PathBuf>,
}

/// Opens the destination (and the identity file) and runs `call` on a runtime
/// of its own; usage problems exit 2, failures 1.
fn with_destination<T>(
    source: &Result<Source, i32>,
    call: impl AsyncFnOnce(&Destination, Option<&Identities>) -> Result<T, BackupError>,
) -> Result<T, i32> {
    let source = source.as_ref().map_err(|code| *code)?;
    let destination =
        Destination::open(&source.destination).map_err(|error| fail(EXIT_USAGE, &error))?;
    let identities = match &source.age_identity {
        Some(path) => Some(Identities::from_file(path).map_err(|error| fail(EXIT_USAGE, &error))?),
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| fail(EXIT_FAILURE, &error))?;
    runtime
        .block_on(call(&destination, identities.as_ref()))
        .map_err(|error| match error {
            BackupError::InvalidDestination { .. } => fail(EXIT_USAGE, &error),
            error => fail(EXIT_FAILURE, &error),
        })
}

/// Parses `--txid`: 16 hex digits as ltxfs prints TXIDs, `0x` and hex, or decimal.
fn parse_txid(text: &str) -> Option<TxId> {
    let parsed = if let Some(hex) = text.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else if text.len() == 16 {
        u64::from_str_radix(text, 16).ok()
    } else {
        text.parse().ok()
    };
    parsed.filter(|txid| *txid > 0).map(TxId)
}

pub(super) fn run_restore(
    source: &Result<Source, i32>,
    name: &str,
    output: &Path,
    (txid, timestamp): (Option<&str>, Option<&str>),
    if_not_exists: bool,
) -> i32 {
    if if_not_exists && output.exists() {
        println!("{} exists; nothing restored", output.display());
        return 0;
    }
    let target = match (txid, timestamp) {
        (Some(text), _) => match parse_txid(text) {
            Some(txid) => Target::TxId(txid),
            None => {
                eprintln!(
                    "ltxfs: error: --txid {text:?} is not a TXID (decimal, 0x-hex, or 16 hex digits)"
                );
                return EXIT_USAGE;
            }
        },
        (None, Some(text)) => match chrono::DateTime::parse_from_rfc3339(text) {
            Ok(time) if time.timestamp_millis() >= 0 => {
                Target::Time(time.timestamp_millis() as u64)
            }
            _ => {
                eprintln!(
                    "ltxfs: error: --timestamp {text:?} is not an RFC 3339 time such as 2026-12-06T10:00:00Z"
                );
                return EXIT_USAGE;
            }
        },
        (None, None) => Target::Latest,
    };
    let mut terminal = TerminalProgress {
        name,
        on_terminal: std::io::stderr().is_terminal(),
        shown: None,
    };
    keep_freed_buffers();
    let restored = with_destination(source, async |destination, identities| {
        let restored = backup::restore(
            destination,
            name,
            target,
            output,
            identities,
            &mut |so_far| terminal.show(so_far),
        )
        .await;
        terminal.end_line();
        restored
    });
    match restored {
        Ok(restored) => {
            println!(
                "restored {name} to TXID {} ({}), checksum {}, {} bytes, into {} (from {} object{})",
                restored.txid,
                format_timestamp_millis(restored.timestamp_ms),
                restored.checksum,
                restored.bytes,
                output.display(),
                restored.objects,
                if restored.objects == 1 { "" } else { "s" }
            );
            0
        }
        Err(code) => code,
    }
}

/// Allocations up to this size come from the heap rather than from a
/// mapping of their own.
#[cfg(target_env = "gnu")]
const HEAP_ALLOCATIONS_UP_TO: libc::c_int = 4 << 20;
/// Freed memory the heap keeps for reuse before it returns any to the kernel.
#[cfg(target_env = "gnu")]
const FREED_MEMORY_KEPT: libc::c_int = 64 << 20;

/// A restore downloads into buffers of a few hundred KiB that one thread
/// fills and another frees. By default glibc hands such freed memory back to
/// the kernel and faults it in again for the next buffer: about a hundred
/// thousand page faults per GiB restored. `ltxfs restore` is a process of its
/// own, so it keeps that memory for reuse instead, within the restore's
/// memory bound.
fn keep_freed_buffers() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; it is called before the
    // runtime's threads start, and a refusal (return 0) leaves the defaults.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, HEAP_ALLOCATIONS_UP_TO);
        libc::mallopt(libc::M_TRIM_THRESHOLD, FREED_MEMORY_KEPT);
    }
}

/// A restore's progress on one line of a terminal, redrawn as it changes.
struct TerminalProgress<'a> {
    name: &'a str,
    on_terminal: bool,
    /// The percent and objects done last shown, if anything was.
    shown: Option<(u64, usize)>,
}

impl TerminalProgress<'_> {
    fn show(&mut self, so_far: backup::RestoreProgress) {
        let line = (so_far.percent(), so_far.objects_done);
        if self.on_terminal && self.shown != Some(line) {
            self.shown = Some(line);
            eprint!(
                "\rrestoring {}: {}% of {}, {}/{} objects",
                self.name,
                so_far.percent(),
                size_text(so_far.bytes),
                so_far.objects_done,
                so_far.objects
            );
        }
    }

    /// Ends the progress line, so that what follows (the result, or an error)
    /// starts on a line of its own.
    fn end_line(&mut self) {
        if self.shown.take().is_some() {
            eprintln!();
        }
    }
}

/// A size for people: bytes, KiB, MiB or GiB with one decimal.
fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 3] = ["KiB", "MiB", "GiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

pub(super) fn run_list(source: &Result<Source, i32>, name: Option<&str>, json: bool) -> i32 {
    let summaries = match with_destination(source, async |destination, _| {
        backup::inspect::list(destination, name).await
    }) {
        Ok(summaries) => summaries,
        Err(code) => return code,
    };
    if json {
        match serde_json::to_string_pretty(&summaries) {
            Ok(text) => println!("{text}"),
            Err(error) => return fail(EXIT_FAILURE, &error),
        }
        return 0;
    }
    let time = |millis: Option<u64>| millis.map_or("-".to_string(), format_timestamp_millis);
    let txid = |txid: Option<u64>| txid.map_or("-".to_string(), |txid| TxId(txid).to_string());
    println!(
        "{:<24} {:<16} {:<24} {:<16} {:<24} {:>8} {:>12}  DESTINATION",
        "DATABASE",
        "EARLIEST TXID",
        "EARLIEST TIME",
        "LATEST TXID",
        "LATEST TIME",
        "OBJECTS",
        "BYTES"
    );
    for summary in &summaries {
        println!(
            "{:<24} {:<16} {:<24} {:<16} {:<24} {:>8} {:>12}  {}",
            summary.database,
            txid(summary.earliest_txid),
            time(summary.earliest_time_ms),
            txid(summary.latest_txid),
            time(summary.latest_time_ms),
            summary.objects,
            summary.bytes,
            summary.destination
        );
    }
    0
}

pub(super) fn run_verify(source: &Result<Source, i32>, name: Option<&str>) -> i32 {
    let scratch = std::env::temp_dir();
    match with_destination(source, async |destination, identities| {
        backup::inspect::verify(destination, name, &scratch, identities).await
    }) {
        Ok(verified) => {
            println!(
                "ok: {} objects are sound; the newest state of {} databases restores",
                verified.objects, verified.databases
            );
            if verified.sealed_databases > 0 {
                println!(
                    "{} databases are encrypted and were checked by SHA-256 only; pass \
                     --age-identity FILE to check their contents",
                    verified.sealed_databases
                );
            }
            0
        }
        Err(code) => code,
    }
}

#[cfg(test)]
mod tests {
    use super::size_text;

    #[test]
    fn sizes_are_shown_in_the_largest_unit_below_them() {
        assert_eq!(size_text(0), "0 bytes");
        assert_eq!(size_text(1023), "1023 bytes");
        assert_eq!(size_text(1024), "1.0 KiB");
        assert_eq!(size_text(8192), "8.0 KiB");
        assert_eq!(size_text(524_812_288), "500.5 MiB");
        assert_eq!(size_text(1_085_066_854), "1.0 GiB");
        assert_eq!(size_text(3 << 30), "3.0 GiB");
        assert_eq!(size_text(u64::MAX), "17179869184.0 GiB");
    }
}
