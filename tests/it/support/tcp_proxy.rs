//! A TCP proxy for the cluster tests that can cut what goes through it off the
//! network, as a partition would.
//!
//! [`TcpProxy::start`] listens on a free loopback port and forwards every
//! connection to one upstream address, connecting to it when the connection is
//! accepted. [`TcpProxy::partition`] stops all traffic:
//!
//! - on the connections already open, no byte is forwarded in either direction
//!   and no end of stream either, but both sockets stay open: the endpoints see
//!   silence, neither an error nor a close. Bytes are held (in the proxy's buffer
//!   and in the kernel's socket buffers, which fill, so a sender eventually
//!   blocks), not dropped: a stream whose bytes were dropped would be corrupt
//!   after a heal, whereas real TCP keeps retransmitting them;
//! - new connections are accepted but never forwarded, not even after a heal:
//!   what they carry is read and discarded until their client closes them (a
//!   black hole, so only a client with a deadline gets past it).
//!
//! [`TcpProxy::heal`] forwards again on the connections opened before the
//! partition (what was held arrives, as TCP's retransmissions would deliver it)
//! and forwards new connections normally.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (two threads each);
//! more are closed at once and counted in [`ProxyStats::refused`]. Dropping the
//! proxy shuts every socket down and joins every thread.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The most connections (forwarded or black-holed) open at once.
pub const MAX_CONNECTIONS: usize = 128;
/// How often the accept loop looks for a new connection or a stop.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// The bound on connecting to the upstream address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The size of each direction's buffer.
const BUFFER_SIZE: usize = 16 * 1024;

/// What a proxy has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections accepted and forwarded (opened while not partitioned).
    pub forwarded: usize,
    /// Connections accepted during a partition (never forwarded).
    pub black_holed: usize,
    /// Connections closed at once because [`MAX_CONNECTIONS`] were open.
    pub refused: usize,
    /// Connections whose upstream could not be reached (closed at once).
    pub upstream_failures: usize,
}

/// A running proxy; dropping it closes every connection.
pub struct TcpProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    state: Mutex<State>,
    /// Signalled when `partitioned` or `stopped` changes.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    partitioned: bool,
    stopped: bool,
    /// The sockets of every open connection (both sides), by connection number,
    /// so that a stop can shut them down and wake every blocked thread.
    sockets: HashMap<u64, Vec<TcpStream>>,
    next_connection: u64,
    threads: Vec<JoinHandle<()>>,
    stats: ProxyStats,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy's port");
        let address = listener.local_addr().expect("the proxy's address");
        listener
            .set_nonblocking(true)
            .expect("make the proxy's listener non-blocking");
        let shared = Arc::new(Shared {
            upstream,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let accept_thread = thread::Builder::new()
            .name(format!("proxy-{address}"))
            .spawn({
                let shared = shared.clone();
                move || accept_loop(&listener, &shared)
            })
            .expect("spawn the proxy's accept thread");
        TcpProxy {
            address,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    /// `http://<address>`, the URL clients connect to.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Stops forwarding (see the module documentation).
    pub fn partition(&self) {
        self.shared.lock().partitioned = true;
        self.shared.changed.notify_all();
    }

    /// Forwards again on the connections opened before the partition, and new
    /// connections normally.
    pub fn heal(&self) {
        self.shared.lock().partitioned = false;
        self.shared.changed.notify_all();
    }

    /// What the proxy has done so far.
    pub fn stats(&self) -> ProxyStats {
        self.shared.lock().stats
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stopped = true;
            for socket in state.sockets.values().flatten() {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
        self.shared.changed.notify_all();
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        // The accept loop has ended: no thread is added any more. Threads that
        // registered sockets after the shutdown above see `stopped` and end.
        let threads = std::mem::take(&mut self.shared.lock().threads);
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the proxy is partitioned; false once it is stopped.
    fn wait_until_connected(&self) -> bool {
        let mut state = self.lock();
        while state.partitioned && !state.stopped {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        !state.stopped
    }

    /// Registers a connection's sockets; `None` when the proxy is stopping (the
    /// sockets are then shut down by the caller dropping them).
    fn register(&self, sockets: &[&TcpStream]) -> Option<u64> {
        let mut clones = Vec::new();
        for socket in sockets {
            clones.push(socket.try_clone().ok()?);
        }
        let mut state = self.lock();
        if state.stopped {
            return None;
        }
        let number = state.next_connection;
        state.next_connection += 1;
        state.sockets.insert(number, clones);
        Some(number)
    }

    /// Adds sockets to a registered connection (its upstream side, once
    /// connected); false when the proxy is stopping.
    fn register_more(&self, number: u64, socket: &TcpStream) -> bool {
        let Ok(clone) = socket.try_clone() else {
            return false;
        };
        let mut state = self.lock();
        if state.stopped {
            return false;
        }
        state.sockets.entry(number).or_default().push(clone);
        true
    }

    fn deregister(&self, number: u64) {
        if let Some(sockets) = self.lock().sockets.remove(&number) {
            for socket in sockets {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        if shared.lock().stopped {
            return;
        }
        let client = match listener.accept() {
            Ok((client, _)) => client,
            // Nothing to accept (or a failed accept, e.g. out of descriptors).
            Err(_) => {
                thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let mut state = shared.lock();
        // Forget the threads that ended, so the list stays bounded.
        let (ended, running): (Vec<_>, Vec<_>) = std::mem::take(&mut state.threads)
            .into_iter()
            .partition(JoinHandle::is_finished);
        state.threads = running;
        for thread in ended {
            let _ = thread.join();
        }
        if state.sockets.len() >= MAX_CONNECTIONS {
            state.stats.refused += 1;
            drop(state);
            drop(client);
            continue;
        }
        let partitioned = state.partitioned;
        if partitioned {
            state.stats.black_holed += 1;
        }
        drop(state);
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        let Some(number) = shared.register(&[&client]) else {
            return;
        };
        let spawned = thread::Builder::new()
            .name(format!("proxy-conn-{number}"))
            .spawn({
                let shared = shared.clone();
                move || {
                    if partitioned {
                        black_hole(client);
                    } else {
                        forward(&shared, number, client);
                    }
                    shared.deregister(number);
                }
            });
        match spawned {
            Ok(thread) => shared.lock().threads.push(thread),
            Err(_) => shared.deregister(number),
        }
    }
}

/// Reads and discards what `client` sends until it closes the connection or the
/// proxy stops (which shuts the socket down).
fn black_hole(mut client: TcpStream) {
    let mut buffer = vec![0; BUFFER_SIZE];
    while matches!(client.read(&mut buffer), Ok(n) if n > 0) {}
}

/// Connects to the upstream address and forwards both directions until both
/// ended.
fn forward(shared: &Arc<Shared>, number: u64, client: TcpStream) {
    let Ok(upstream) = TcpStream::connect_timeout(&shared.upstream, CONNECT_TIMEOUT) else {
        shared.lock().stats.upstream_failures += 1;
        return;
    };
    shared.lock().stats.forwarded += 1;
    let _ = upstream.set_nodelay(true);
    if !shared.register_more(number, &upstream) {
        return;
    }
    let (Ok(client_reader), Ok(upstream_reader)) = (client.try_clone(), upstream.try_clone())
    else {
        return;
    };
    let backward = thread::Builder::new()
        .name(format!("proxy-conn-{number}-back"))
        .spawn({
            let shared = shared.clone();
            move || pump(&shared, upstream_reader, client)
        });
    pump(shared, client_reader, upstream);
    if let Ok(backward) = backward {
        let _ = backward.join();
    }
}

/// Copies `from` to `to`, holding everything while the proxy is partitioned. At
/// the end of `from`'s stream, half-closes `to`; after an error, shuts both
/// sockets down, so the other direction ends too; either only once the proxy is
/// not partitioned.
fn pump(shared: &Shared, mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = vec![0; BUFFER_SIZE];
    loop {
        if !shared.wait_until_connected() {
            return;
        }
        match from.read(&mut buffer) {
            Ok(0) => {
                if shared.wait_until_connected() {
                    let _ = to.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => {
                if !shared.wait_until_connected() {
                    return;
                }
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // Even a failure stays unseen until the heal.
    if shared.wait_until_connected() {
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    }
}
