//! Starts and stops the ltxfs mount the benchmark measures, as a child process.
//!
//! The mount runs in a separate `ltxfs mount` process (the `ltxfs` beside this
//! program, or the one named by `LTXFS_BIN`) so that the benchmark measures what
//! users get, and so that a crash of the filesystem cannot take the benchmark
//! down with it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use test_support::{
    NotMounted, exit_with_parent, force_unmount, wait_timeout, wait_until_mounted, write_config,
};

use super::{BenchError, ltxfs_mounted};

/// How long the mount may take to appear.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long ltxfs may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of the end of ltxfs's output goes into error messages.
const OUTPUT_TAIL_BYTES: u64 = 4096;

/// The mount point inside the benchmark directory.
pub(super) fn mount_point(base: &Path, name: &str) -> PathBuf {
    base.join(name)
}

/// A running `ltxfs mount` child. Dropping it stops the child and, if need be,
/// unmounts by force, so error paths cannot leave a mount behind. Start it from a
/// thread that outlives it (the benchmark's main thread): the child is told to
/// exit when the thread that started it ends.
pub(super) struct MountGuard {
    child: Option<Child>,
    /// False once `stop` has run, so that dropping the guard afterwards does nothing.
    active: bool,
    mount_point: PathBuf,
    log_path: PathBuf,
}

impl MountGuard {
    /// Writes the configuration under `base` (an absolute path), starts ltxfs and
    /// waits until the mount serves.
    /// `name` names the mount point and its files under `base`; `capture` off
    /// mounts with `--no-capture`, to measure what change capture costs.
    pub(super) fn start(base: &Path, name: &str, capture: bool) -> Result<MountGuard, BenchError> {
        MountGuard::start_configured(base, name, capture, "")
    }

    /// Like [`MountGuard::start`], with `extra_config` (whole YAML sections other
    /// than `data` and `http`, e.g. `lease`) appended to the configuration.
    pub(super) fn start_configured(
        base: &Path,
        name: &str,
        capture: bool,
        extra_config: &str,
    ) -> Result<MountGuard, BenchError> {
        let mount_point = mount_point(base, name);
        let config_path = base.join(format!("{name}.yml"));
        let log_path = base.join(format!("{name}.log"));
        super::create_dir(&mount_point)?;
        write_config(
            &config_path,
            &base.join(format!("{name}-data")),
            None,
            extra_config,
        )
        .map_err(|cause| BenchError::Io {
            action: "write the configuration",
            path: config_path.clone(),
            cause,
        })?;

        // ltxfs's output goes to a file rather than a pipe: a pipe nobody drains
        // would block ltxfs once it filled up during a long run.
        let log_error = |cause| BenchError::Io {
            action: "create the log file",
            path: log_path.clone(),
            cause,
        };
        let stdout = File::create(&log_path).map_err(log_error)?;
        let stderr = stdout.try_clone().map_err(log_error)?;

        let binary = ltxfs_binary()?;
        let mut command = Command::new(&binary);
        command
            .arg("mount")
            .arg(&mount_point)
            .arg("--config")
            .arg(&config_path)
            .args((!capture).then_some("--no-capture"))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        exit_with_parent(&mut command);
        let child = command
            .spawn()
            .map_err(|cause| BenchError::Spawn { binary, cause })?;
        let mut guard = MountGuard {
            child: Some(child),
            active: true,
            mount_point,
            log_path,
        };
        // On error the guard is dropped here, which stops the child.
        guard.wait_until_ready()?;
        Ok(guard)
    }

    pub(super) fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// The file that receives everything ltxfs prints.
    pub(super) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The ltxfs process's id, while it runs.
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn wait_until_ready(&mut self) -> Result<(), BenchError> {
        let child = self.child.as_mut().expect("started and not stopped yet");
        match wait_until_mounted(child, &self.mount_point, READY_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(NotMounted::Exited(status)) => {
                self.child = None;
                Err(BenchError::MountExited {
                    mount_point: self.mount_point.clone(),
                    status: status.to_string(),
                    output: self.output_tail(),
                })
            }
            Err(NotMounted::TimedOut) => Err(BenchError::MountTimeout {
                mount_point: self.mount_point.clone(),
                timeout: READY_TIMEOUT,
                output: self.output_tail(),
            }),
            Err(NotMounted::Io(cause)) => Err(BenchError::Io {
                action: "check on the ltxfs process for",
                path: self.mount_point.clone(),
                cause,
            }),
        }
    }

    /// Asks ltxfs to exit with SIGTERM, kills it if it has not exited after 10 s, and
    /// unmounts by force if the mount is still there (also when ltxfs had already
    /// exited on its own). Any of these fallbacks, and an unsuccessful exit, are
    /// reported as an error; the mount is gone either way unless the forced unmount
    /// failed too.
    pub(super) fn stop(&mut self) -> Result<(), BenchError> {
        if !self.active {
            return Ok(());
        }
        self.active = false;
        let mut problems = Vec::new();
        if let Some(child) = self.child.take() {
            stop_child(child, &mut problems);
        }
        match ltxfs_mounted(&self.mount_point) {
            Ok(false) => {}
            Ok(true) => {
                problems.push("the mount was still there after ltxfs exited".to_string());
                if let Err(problem) = force_unmount(&self.mount_point) {
                    problems.push(problem);
                }
            }
            Err(error) => problems.push(error.to_string()),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(BenchError::Shutdown {
                mount_point: self.mount_point.clone(),
                problem: problems.join("; "),
                output: self.output_tail(),
            })
        }
    }

    /// The last few KiB of what ltxfs printed, for error messages.
    fn output_tail(&self) -> String {
        let mut text = Vec::new();
        let read = File::open(&self.log_path).and_then(|mut file| {
            let length = file.metadata()?.len();
            let start = length.saturating_sub(OUTPUT_TAIL_BYTES);
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start))?;
            file.read_to_end(&mut text)
        });
        match read {
            Err(error) => format!("(could not read {}: {error})", self.log_path.display()),
            Ok(_) => {
                let text = String::from_utf8_lossy(&text);
                let text = text.trim();
                if text.is_empty() {
                    "(nothing)".to_string()
                } else {
                    text.to_string()
                }
            }
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        // On the success path `stop` has already run and reported any problem.
        let _ = self.stop();
    }
}

/// The ltxfs executable: `LTXFS_BIN` if set (`ltxfs bench` sets it to itself),
/// otherwise the `ltxfs` beside this program.
pub(crate) fn ltxfs_binary() -> Result<PathBuf, BenchError> {
    if let Some(binary) = std::env::var_os("LTXFS_BIN") {
        return Ok(PathBuf::from(binary));
    }
    let this = std::env::current_exe().map_err(|cause| BenchError::Io {
        action: "find the running executable",
        path: PathBuf::from("/proc/self/exe"),
        cause,
    })?;
    let binary = this.with_file_name("ltxfs");
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(BenchError::NoLtxfs { beside: this })
    }
}

/// Asks the child to exit with SIGTERM and waits up to `STOP_TIMEOUT`, then kills it.
/// Everything unexpected is added to `problems`.
fn stop_child(mut child: Child, problems: &mut Vec<String>) {
    match libc::pid_t::try_from(child.id()) {
        // SAFETY: `kill` has no memory-safety preconditions. The pid is that of our
        // own child, which has not been reaped, so it cannot name another process.
        Ok(pid) => unsafe {
            libc::kill(pid, libc::SIGTERM);
        },
        Err(_) => problems.push(format!("pid {} does not fit a pid_t", child.id())),
    }
    match wait_timeout(&mut child, STOP_TIMEOUT) {
        Ok(Some(status)) if status.success() => {}
        Ok(Some(status)) => problems.push(format!("ltxfs exited with {status} after SIGTERM")),
        Ok(None) => {
            problems.push(format!(
                "ltxfs did not exit within {} s of SIGTERM and was killed",
                STOP_TIMEOUT.as_secs()
            ));
            kill(&mut child, problems);
        }
        Err(error) => {
            problems.push(format!("could not wait for ltxfs: {error}"));
            kill(&mut child, problems);
        }
    }
}

/// Sends SIGKILL and reaps the child.
fn kill(child: &mut Child, problems: &mut Vec<String>) {
    if let Err(error) = child.kill().and_then(|()| child.wait().map(drop)) {
        problems.push(format!("could not kill ltxfs: {error}"));
    }
}
