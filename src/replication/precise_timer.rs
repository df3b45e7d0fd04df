//! A timer with the kernel's precision, for waits shorter than tokio's timers
//! can time: tokio rounds every deadline up to its next millisecond tick, so a
//! wait of under a millisecond lasts up to two. A live stream's batching
//! interval (`LIVE_BATCH_INTERVAL`) is that short, and every extra microsecond
//! of it is a replica's lag.
//!
//! The timer is a `timerfd` on `CLOCK_MONOTONIC` (the clock `Instant` reads),
//! registered with the runtime's I/O driver, so waiting on it costs no thread.
//! Invariant: [`PreciseTimer::sleep_until`] returns no earlier than its
//! deadline; dropping its future leaves the timer armed, and the next call
//! re-arms it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// One timer; one wait at a time.
pub(super) struct PreciseTimer {
    fd: AsyncFd<OwnedFd>,
}

impl PreciseTimer {
    /// Creates the timer (must be called within a tokio runtime).
    pub(super) fn new() -> io::Result<PreciseTimer> {
        // SAFETY: timerfd_create has no memory-safety preconditions.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: the timer owns `fd`, which stays open and the same descriptor
        // until the `AsyncFd` is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|error| error.into_parts().1)?;
        Ok(PreciseTimer { fd })
    }

    /// Waits until `deadline`; returns at once when it has passed.
    pub(super) async fn sleep_until(&mut self, deadline: Instant) -> io::Result<()> {
        let Some(wait) = deadline.checked_duration_since(Instant::now()) else {
            return Ok(());
        };
        // A zero expiry would disarm the timer rather than fire it.
        if wait.is_zero() {
            return Ok(());
        }
        let expiry = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            },
        };
        let fd = self.fd.get_ref().as_raw_fd();
        // SAFETY: `fd` is this timer's open timerfd, `expiry` is a valid
        // itimerspec and the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd, 0, &expiry, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        loop {
            let mut ready = self.fd.readable().await?;
            let expired = ready.try_io(|fd| {
                let mut count = [0u8; 8];
                // SAFETY: `count` is 8 writable bytes, what a timerfd read needs.
                let read =
                    unsafe { libc::read(fd.get_ref().as_raw_fd(), count.as_mut_ptr().cast(), 8) };
                if read < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match expired {
                Ok(result) => return result,
                // Not expired yet: the readiness was stale.
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn waits_at_least_until_the_deadline_and_not_for_a_past_one() {
        let mut timer = PreciseTimer::new().unwrap();
        for micros in [200, 700, 1500] {
            let started = Instant::now();
            let deadline = started + Duration::from_micros(micros);
            timer.sleep_until(deadline).await.unwrap();
            assert!(Instant::now() >= deadline, "woke before {micros} µs");
        }
        let started = Instant::now();
        timer.sleep_until(started).await.unwrap();
        timer
            .sleep_until(started - Duration::from_millis(1))
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
