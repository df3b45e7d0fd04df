//! Captures one test thread's log events, shared by the in-crate replication
//! tests (through `#[path]`) and the protocol integration tests.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long [`Logs::wait_for`] waits for a line.
const LOG_TIMEOUT: Duration = Duration::from_secs(20);

/// The log of one test's thread.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures the events of this thread until the guard is dropped.
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("ltxfs=debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits for a line at `level` containing every one of `parts`.
    pub async fn wait_for(&self, level: &str, parts: &[&str]) -> String {
        let deadline = Instant::now() + LOG_TIMEOUT;
        loop {
            let text = self.text();
            let found = text
                .lines()
                .find(|line| line.contains(level) && parts.iter().all(|part| line.contains(part)));
            if let Some(line) = found {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {level} line with {parts:?} in the log:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
