//! Child processes and threads with bounded waits, and loopback ports.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often a child is checked on while waiting for it.
const POLL: Duration = Duration::from_millis(10);

/// Makes the kernel send SIGTERM to the child when the thread that spawns it
/// ends (with its process, even on SIGKILL), so nothing it started outlives
/// it. Spawn from a thread that outlives the child.
pub fn exit_with_parent(command: &mut Command) {
    // SAFETY: `getpid` has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the child between fork and exec; it only makes
    // the async-signal-safe system calls `prctl` and `getppid` and builds errors
    // from error numbers, which does not allocate.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the request took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Waits at most `timeout` for `child` to exit; `None` when it still runs.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// Runs `f` on a thread of its own and waits at most `timeout` for its result.
/// A call that hangs (a system call into a wedged mount) is abandoned; its
/// thread ends when the call does.
pub fn run_bounded<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout).ok()
}

/// `N` loopback addresses whose ports were free a moment ago, all different
/// (they are found together).
pub fn free_loopback_addresses<const N: usize>() -> io::Result<[SocketAddr; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    let mut addresses = [SocketAddr::from(([127, 0, 0, 1], 0)); N];
    for (address, listener) in addresses.iter_mut().zip(&listeners) {
        *address = listener.local_addr()?;
    }
    Ok(addresses)
}
