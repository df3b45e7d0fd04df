//! `ltxfs mount` as a child process: its config, waiting until it serves, and
//! unmounting what a stopped one left.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::run_bounded;

/// How often the mount table and the child are checked while waiting.
const POLL: Duration = Duration::from_millis(10);

/// Writes an `ltxfs.yml` at `path` with `data.dir`, `fuse.dir` if given, and
/// `extra` (whole top-level YAML sections). Unless `extra` has an `http`
/// section, the node API listens on a port the kernel picks, so nodes started
/// at once never collide.
pub fn write_config(
    path: &Path,
    data_dir: &Path,
    fuse_dir: Option<&Path>,
    extra: &str,
) -> io::Result<()> {
    let mut text = format!(
        "data:\n  dir: {}\n",
        yaml_quote(&data_dir.to_string_lossy())
    );
    if let Some(fuse_dir) = fuse_dir {
        text.push_str(&format!(
            "fuse:\n  dir: {}\n",
            yaml_quote(&fuse_dir.to_string_lossy())
        ));
    }
    text.push_str(extra);
    if !extra.lines().any(|line| line.starts_with("http:")) {
        text.push_str("http:\n  addr: \"127.0.0.1:0\"\n");
    }
    std::fs::write(path, text)
}

/// `text` as a YAML double-quoted scalar.
pub fn yaml_quote(text: &str) -> String {
    let mut quoted = String::from("\"");
    for character in text.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            other => quoted.push(other),
        }
    }
    quoted.push('"');
    quoted
}

/// Why [`wait_until_mounted`] gave up.
#[derive(Debug)]
pub enum NotMounted {
    /// ltxfs exited first (it has been reaped).
    Exited(ExitStatus),
    /// The mount did not serve in time.
    TimedOut,
    /// The child or the mount table could not be checked on.
    Io(io::Error),
}

/// Waits at most `timeout` until the child `ltxfs mount` serves
/// `mount_point`: the mount table lists an ltxfs mount there, and its root, on
/// another device than its parent, can be listed (a stale mount of a killed
/// run is listed too, but answers `ENOTCONN`). The listing runs on a thread
/// of its own, so a wedged mount cannot hang the wait.
pub fn wait_until_mounted(
    child: &mut Child,
    mount_point: &Path,
    timeout: Duration,
) -> Result<(), NotMounted> {
    let deadline = Instant::now() + timeout;
    let parent = mount_point.parent().unwrap_or(mount_point);
    let parent_dev = std::fs::metadata(parent).map_err(NotMounted::Io)?.dev();
    loop {
        if let Some(status) = child.try_wait().map_err(NotMounted::Io)? {
            return Err(NotMounted::Exited(status));
        }
        let mounted = || ltxfs::mountinfo::is_ltxfs_mount(mount_point).map_err(NotMounted::Io);
        if mounted()? {
            let left = deadline.saturating_duration_since(Instant::now());
            let root = mount_point.to_path_buf();
            match run_bounded(left.max(POLL), move || answers(&root, parent_dev)) {
                Some(true) if mounted()? => return Ok(()),
                Some(_) => {}
                None => return Err(NotMounted::TimedOut),
            }
        }
        if Instant::now() >= deadline {
            return Err(NotMounted::TimedOut);
        }
        std::thread::sleep(POLL);
    }
}

/// True when `root` is the root of a live mount: opening it gives a directory
/// on another device than its parent (`parent_dev`), whose filesystem answers
/// `fstatfs` and lists it. Both go through the opened directory, so a
/// concurrent unmount cannot redirect them to the directory underneath. The
/// listing alone is not enough: after its ltxfs was killed, the kernel still
/// lists a mount's root from its cache, but `statfs` asks the dead ltxfs
/// (`ENOTCONN`).
pub fn answers(root: &Path, parent_dev: u64) -> bool {
    let Ok(dir) = File::open(root) else {
        return false;
    };
    match dir.metadata() {
        Ok(meta) if meta.is_dir() && meta.dev() != parent_dev => {}
        _ => return false,
    }
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `dir` is an open descriptor and `stats` is writable memory of
    // the right size.
    if unsafe { libc::fstatvfs(dir.as_raw_fd(), stats.as_mut_ptr()) } != 0 {
        return false;
    }
    std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
        .and_then(|entries| entries.collect::<io::Result<Vec<_>>>())
        .is_ok()
}

/// Detaches everything mounted on `path` (lazily: open files keep working).
/// `umount -l` needs root; others get the same from `fusermount3 -uz` or
/// `fusermount -uz`. Says what failed when something is still mounted.
pub fn force_unmount(path: &Path) -> Result<(), String> {
    const ATTEMPTS: [(&str, &[&str]); 3] = [
        ("umount", &["-l"]),
        ("fusermount3", &["-u", "-z"]),
        ("fusermount", &["-u", "-z"]),
    ];
    let mut failures = Vec::new();
    // Mounts may be stacked: each round detaches the top one.
    for _ in 0..5 {
        match ltxfs::mountinfo::find(path) {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => {}
            Err(error) => return Err(format!("could not read the mount table: {error}")),
        }
        let detached = ATTEMPTS.iter().any(|(program, args)| {
            let outcome = Command::new(program)
                .args(*args)
                .arg(path)
                .stdin(Stdio::null())
                .output();
            match outcome {
                Ok(output) if output.status.success() => true,
                Ok(output) => {
                    failures.push(format!(
                        "{program} failed ({}): {}",
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    ));
                    false
                }
                Err(error) => {
                    failures.push(format!("could not run {program}: {error}"));
                    false
                }
            }
        });
        if !detached {
            break;
        }
    }
    if failures.is_empty() {
        failures.push("still mounted after five unmounts".to_string());
    }
    Err(format!(
        "could not unmount {}: {}",
        path.display(),
        failures.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_quote_escapes_quotes_and_backslashes() {
        assert_eq!(yaml_quote("/a b/\"c\"\\d"), r#""/a b/\"c\"\\d""#);
        assert_eq!(yaml_quote("a\nb\tc"), r#""a\nb\tc""#);
    }

    #[test]
    fn the_config_listens_on_a_free_port_unless_told_otherwise() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("ltxfs.yml");
        write_config(&path, Path::new("/d"), None, "lease:\n  type: static\n").expect("writes");
        assert_eq!(
            std::fs::read_to_string(&path).expect("reads"),
            "data:\n  dir: \"/d\"\nlease:\n  type: static\nhttp:\n  addr: \"127.0.0.1:0\"\n"
        );
        write_config(
            &path,
            Path::new("/d"),
            Some(Path::new("/m")),
            "http:\n  addr: \":1\"\n",
        )
        .expect("writes");
        assert_eq!(
            std::fs::read_to_string(&path).expect("reads"),
            "data:\n  dir: \"/d\"\nfuse:\n  dir: \"/m\"\nhttp:\n  addr: \":1\"\n"
        );
    }
}
