//! A one-line description of the machine the benchmark ran on, so that figures from
//! different runs can be told apart.

use std::fmt;
use std::path::{Path, PathBuf};

/// What the benchmark knows about the machine. Anything it could not find out is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineInfo {
    /// CPU cores available to this process.
    pub cores: Option<usize>,
    /// Total memory (MemTotal in /proc/meminfo), in bytes.
    pub memory_bytes: Option<u64>,
    /// Kernel name, release and architecture, from uname(2).
    pub kernel: Option<String>,
    /// The benchmark directory.
    pub dir: PathBuf,
    /// The type of the filesystem the benchmark directory is on, e.g. `ext4`.
    pub dir_fs_type: Option<String>,
    /// The version of the SQLite library linked into ltxfs.
    pub sqlite_version: String,
}

impl MachineInfo {
    /// Collects the description for a benchmark run in `dir` (an absolute path).
    pub fn collect(dir: &Path) -> MachineInfo {
        MachineInfo {
            cores: std::thread::available_parallelism().ok().map(usize::from),
            memory_bytes: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|text| parse_mem_total(&text)),
            kernel: kernel(),
            dir: dir.to_path_buf(),
            dir_fs_type: std::fs::read_to_string("/proc/self/mountinfo")
                .ok()
                .and_then(|table| fs_type_of(&table, dir)),
            sqlite_version: rusqlite::version().to_string(),
        }
    }
}

impl fmt::Display for MachineInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cores {
            Some(cores) => write!(f, "{cores} cores")?,
            None => write!(f, "unknown cores")?,
        }
        match self.memory_bytes {
            Some(bytes) => write!(f, ", {:.1} GiB memory", bytes as f64 / GIB)?,
            None => write!(f, ", unknown memory")?,
        }
        write!(
            f,
            ", {}",
            self.kernel.as_deref().unwrap_or("unknown kernel")
        )?;
        write!(
            f,
            ", {} at {}",
            self.dir_fs_type.as_deref().unwrap_or("unknown filesystem"),
            self.dir.display()
        )?;
        write!(f, ", SQLite {}", self.sqlite_version)
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Reads `MemTotal:  16303664 kB` from the text of /proc/meminfo.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// The filesystem type of the mount that contains `dir`: the entry with the longest
/// mount point that is a prefix of `dir`, the last one if several are equally long.
fn fs_type_of(mount_table: &str, dir: &Path) -> Option<String> {
    ltxfs::mountinfo::parse(mount_table)
        .into_iter()
        .filter(|entry| dir.starts_with(&entry.mount_point))
        .max_by_key(|entry| entry.mount_point.components().count())
        .map(|entry| entry.fs_type)
}

/// "Linux 6.8.0 x86_64", from uname(2).
fn kernel() -> Option<String> {
    // SAFETY: `utsname` is plain data for which all-zero bytes are valid, and
    // `uname` only writes NUL-terminated strings into the buffer we pass.
    let name = unsafe {
        let mut name: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut name) != 0 {
            return None;
        }
        name
    };
    let field = |chars: &[libc::c_char]| {
        // SAFETY: uname NUL-terminates every field, and the array outlives the CStr.
        unsafe { std::ffi::CStr::from_ptr(chars.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    Some(format!(
        "{} {} {}",
        field(&name.sysname),
        field(&name.release),
        field(&name.machine)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_bytes() {
        let text = "MemTotal:       16303664 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total(text), Some(16_303_664 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn fs_type_is_that_of_the_longest_prefix() {
        let table = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
23 22 0:5 / /tmp rw - tmpfs tmpfs rw
24 22 0:6 / /tmpx rw - xfs /dev/sdb rw
";
        assert_eq!(fs_type_of(table, Path::new("/tmp/a")), Some("tmpfs".into()));
        assert_eq!(fs_type_of(table, Path::new("/tmpx/a")), Some("xfs".into()));
        assert_eq!(fs_type_of(table, Path::new("/home/a")), Some("ext4".into()));
    }

    #[test]
    fn collect_describes_this_machine() {
        let info = MachineInfo::collect(Path::new("/"));
        assert!(info.dir_fs_type.is_some());
        assert!(!info.sqlite_version.is_empty());
        assert!(info.to_string().contains("SQLite"));
    }
}
