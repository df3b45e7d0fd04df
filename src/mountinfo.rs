//! Reads the kernel's mount table to tell whether a directory is an ltxfs mount.
//!
//! Used at start-up (to find and clean a stale mount left by a crashed run), by the
//! benchmark and by the tests (to wait until a mount is ready). It only reads
//! `/proc/self/mountinfo`; it never mounts or unmounts anything.

use std::io;
use std::path::{Path, PathBuf};

/// The source (`fsname`) of every ltxfs mount.
pub const FS_NAME: &str = "ltxfs";

/// One line of `/proc/self/mountinfo`, reduced to what ltxfs needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where the filesystem is mounted.
    pub mount_point: PathBuf,
    /// The filesystem type, e.g. `fuse` or `fuse.ltxfs`.
    pub fs_type: String,
    /// The mount source; ltxfs mounts name themselves [`FS_NAME`].
    pub source: String,
    /// The filesystem's device, `major:minor`; a FUSE mount's minor names its
    /// connection in `/sys/fs/fuse/connections`.
    pub device: String,
}

impl MountEntry {
    /// True for a FUSE mount made by ltxfs (the kernel reports type `fuse` or
    /// `fuse.ltxfs`, depending on how it was mounted, with source `ltxfs`).
    pub fn is_ltxfs(&self) -> bool {
        (self.fs_type == "fuse" || self.fs_type == "fuse.ltxfs") && self.source == FS_NAME
    }
}

/// Returns the mount entry whose mount point is exactly `path`, if any.
///
/// `path` is canonicalised by the caller's choice: pass an absolute path. The last
/// matching entry wins, as in the kernel (later mounts hide earlier ones).
pub fn find(path: &Path) -> io::Result<Option<MountEntry>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse(&table)
        .into_iter()
        .rfind(|entry| entry.mount_point == path))
}

/// Returns true when `path` is currently an ltxfs mount point.
pub fn is_ltxfs_mount(path: &Path) -> io::Result<bool> {
    Ok(find(path)?.is_some_and(|entry| entry.is_ltxfs()))
}

/// Parses the text of a mountinfo file. Lines that do not have the documented shape
/// are skipped rather than trusted.
pub fn parse(table: &str) -> Vec<MountEntry> {
    table.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // Format (proc(5)): id parent major:minor root mount-point options [optional...] - fstype source super-options
    let mut fields = line.split(' ');
    let device = fields.nth(2)?;
    let mount_point = fields.nth(1)?;
    let mut rest = fields.skip_while(|field| *field != "-");
    rest.next()?;
    let fs_type = rest.next()?;
    let source = rest.next()?;
    Some(MountEntry {
        mount_point: PathBuf::from(unescape(mount_point)),
        fs_type: fs_type.to_string(),
        source: unescape(source),
        device: device.to_string(),
    })
}

/// Undoes the kernel's octal escaping of space, tab, newline and backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(value) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fuse_entry_with_escaped_space() {
        let table = "36 35 98:0 / /mnt/my\\040data rw,noatime master:1 - fuse.ltxfs ltxfs rw,user_id=0\n\
                     37 35 98:0 / /other rw - ext4 /dev/vda rw\n";
        let entries = parse(table);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].mount_point, PathBuf::from("/mnt/my data"));
        assert_eq!(entries[0].fs_type, "fuse.ltxfs");
        assert_eq!(entries[0].device, "98:0");
        assert!(entries[0].is_ltxfs());
        assert_eq!(entries[1].fs_type, "ext4");
        assert!(!entries[1].is_ltxfs());
    }

    #[test]
    fn recognises_a_plain_fuse_mount_named_ltxfs() {
        let table = "40 35 0:52 / /tmp/mnt rw,nosuid,nodev - fuse ltxfs rw,user_id=0,group_id=0\n\
                     41 35 0:53 / /tmp/other rw - fuse sshfs rw\n";
        let entries = parse(table);
        assert!(entries[0].is_ltxfs());
        assert!(!entries[1].is_ltxfs());
    }

    #[test]
    fn skips_malformed_lines() {
        assert!(parse("garbage\n1 2 3\n").is_empty());
    }
}
