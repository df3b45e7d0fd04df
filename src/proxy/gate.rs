//! The gate between the proxy's writes and the role loop's handoff: a handoff
//! closes it and waits for the writes the application is processing to finish,
//! so no write that reached the application fails because the node stopped being
//! the primary under it; writes that arrive meanwhile wait at the proxy and go to
//! the new primary.
//!
//! Invariants: a [`WritePass`] exists only while the gate was open when it was
//! taken; [`WriteGate::close_and_drain`] returns once none is left or its timeout
//! passes; the gate opens again when the node becomes the primary.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::sync::LockUnpoisoned;
use tokio::sync::watch;

/// Counts the writes in the application and refuses new ones while closed.
#[derive(Debug)]
pub struct WriteGate {
    state: Mutex<GateState>,
    /// Bumped whenever a pass is returned, for [`WriteGate::close_and_drain`].
    returned: watch::Sender<()>,
}

#[derive(Debug)]
struct GateState {
    open: bool,
    in_flight: usize,
}

impl Default for WriteGate {
    fn default() -> WriteGate {
        WriteGate::new()
    }
}

impl WriteGate {
    /// An open gate.
    pub fn new() -> WriteGate {
        WriteGate {
            state: Mutex::new(GateState {
                open: true,
                in_flight: 0,
            }),
            returned: watch::Sender::new(()),
        }
    }

    /// A pass for one write, unless the gate is closed.
    pub fn try_enter(self: &Arc<Self>) -> Option<WritePass> {
        let mut state = self.lock();
        if !state.open {
            return None;
        }
        state.in_flight += 1;
        Some(WritePass { gate: self.clone() })
    }

    /// Lets writes in again.
    pub fn open(&self) {
        self.lock().open = true;
    }

    /// Refuses new writes and waits until the writes in the application have
    /// finished, at most `timeout`; returns how many were still running.
    pub async fn close_and_drain(&self, timeout: Duration) -> usize {
        let mut returned = self.returned.subscribe();
        self.lock().open = false;
        let drained = tokio::time::timeout(timeout, async {
            loop {
                returned.borrow_and_update();
                if self.lock().in_flight == 0 {
                    return;
                }
                // The sender lives in `self`, so this only fails if `self` is gone.
                let _ = returned.changed().await;
            }
        })
        .await;
        match drained {
            Ok(()) => 0,
            Err(_) => self.lock().in_flight,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock_unpoisoned()
    }
}

/// One write in the application; returned to the gate when dropped.
#[derive(Debug)]
pub struct WritePass {
    gate: Arc<WriteGate>,
}

impl Drop for WritePass {
    fn drop(&mut self) {
        self.gate.lock().in_flight -= 1;
        self.gate.returned.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn closing_waits_for_the_writes_in_flight_and_refuses_new_ones() {
        let gate = Arc::new(WriteGate::new());
        let pass = gate.try_enter().unwrap();
        let drain = tokio::spawn({
            let gate = gate.clone();
            async move { gate.close_and_drain(Duration::from_secs(5)).await }
        });
        // The gate closes before the drain waits.
        tokio::time::timeout(Duration::from_secs(5), async {
            while gate.try_enter().is_some() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        assert!(!drain.is_finished());
        drop(pass);
        assert_eq!(drain.await.unwrap(), 0);
        gate.open();
        assert!(gate.try_enter().is_some());
    }

    #[tokio::test]
    async fn a_write_that_does_not_finish_is_waited_for_only_until_the_timeout() {
        let gate = Arc::new(WriteGate::new());
        let _pass = gate.try_enter().unwrap();
        assert_eq!(gate.close_and_drain(Duration::from_millis(20)).await, 1);
    }
}
