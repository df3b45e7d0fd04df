//! The node API's connections: the listener's accept loop (TLS, limits, idle
//! peers) and the settings a client connects with (TLS, the cluster secret).
//!
//! Invariants:
//! - At most [`MAX_CONNECTIONS`] connections are open, at most
//!   [`MAX_CONNECTIONS_PER_ADDRESS`] from one IP address; more are closed at once
//!   ([`AddressSlots`], which bounds the server's streams the same way).
//! - A connection that completes no TLS handshake, or (without TLS) sends no byte,
//!   within [`HANDSHAKE_TIMEOUT`] is closed, so idle peers hold nothing.
//! - With `http.tls.ca`, only peers whose certificate that CA signed get a
//!   connection (mutual TLS); the refusal is logged with the peer's address.
//! - Accepted connections wait in a channel of [`ACCEPTED_CONNECTION_QUEUE`].

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::ReplicationError;
use super::auth::ClusterKeys;
use crate::config::TlsFiles;
use crate::sync::LockUnpoisoned;

/// The most connections the node API keeps open.
pub const MAX_CONNECTIONS: usize = 512;
/// The most connections from one IP address.
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;
/// How long a new connection has to complete its TLS handshake, or to send its
/// first byte without TLS.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Accepted connections waiting for the server to take them.
const ACCEPTED_CONNECTION_QUEUE: usize = 16;

fn tls_error(path: &Path, reason: impl ToString) -> ReplicationError {
    ReplicationError::Tls {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ReplicationError> {
    std::fs::read(path).map_err(|error| tls_error(path, error))
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ReplicationError> {
    let pem = read_pem(path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| tls_error(path, format!("not PEM certificates: {error}")))?;
    if certificates.is_empty() {
        return Err(tls_error(path, "holds no PEM certificate"));
    }
    Ok(certificates)
}

/// The server's TLS settings from `files`.
pub fn server_tls(files: &TlsFiles) -> Result<TlsAcceptor, ReplicationError> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&read_pem(&files.key)?)
        .map_err(|error| tls_error(&files.key, format!("not a PEM private key: {error}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| tls_error(&files.cert, error))?;
    let builder = match &files.ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in certificates(ca)? {
                roots
                    .add(certificate)
                    .map_err(|error| tls_error(ca, error))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|error| tls_error(ca, error))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|error| tls_error(&files.key, error))?;
    // gRPC over HTTP/2; `GET /metrics` may come over HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How a node's client connects: TLS settings for `https://` URLs and the
/// cluster secret it signs calls with. Its `Debug` shows neither the secrets nor
/// the private key.
#[derive(Clone, Default)]
pub struct ClientCredentials {
    /// Signs every call and checks every answer (nothing when empty).
    pub keys: ClusterKeys,
    /// For `https://` URLs; `None` verifies servers with the web's public roots.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClientCredentials")
            .field("keys", &self.keys)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ClientCredentials {
    /// Credentials from the node's `http` settings.
    pub fn new(
        keys: ClusterKeys,
        tls: Option<&TlsFiles>,
    ) -> Result<ClientCredentials, ReplicationError> {
        let tls = match tls {
            Some(files) => {
                let cert = read_pem(&files.cert)?;
                let key = read_pem(&files.key)?;
                let config = tonic::transport::ClientTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key));
                Some(match &files.ca {
                    Some(ca) => {
                        certificates(ca)?;
                        config
                            .ca_certificate(tonic::transport::Certificate::from_pem(read_pem(ca)?))
                    }
                    None => config.with_webpki_roots(),
                })
            }
            None => None,
        };
        Ok(ClientCredentials { keys, tls })
    }

    /// The TLS settings for an `https://` URL.
    pub(super) fn tls_for_https(&self) -> tonic::transport::ClientTlsConfig {
        self.tls
            .clone()
            .unwrap_or_else(|| tonic::transport::ClientTlsConfig::new().with_webpki_roots())
    }
}

/// One accepted connection, TLS or not, holding its place in the limits.
pub struct NodeConnection {
    stream: Stream,
    info: TcpConnectInfo,
    _slot: Slot,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for NodeConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for NodeConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for NodeConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(stream) => stream.is_write_vectored(),
            Stream::Tls(stream) => stream.is_write_vectored(),
        }
    }
}

/// Places for connections or streams, bounded in total and per IP address.
#[derive(Debug)]
pub struct AddressSlots {
    total_limit: usize,
    per_address_limit: usize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

/// A place taken in [`AddressSlots`], given back on drop.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<AddressSlots>,
    address: IpAddr,
}

impl AddressSlots {
    /// At most `total_limit` places, `per_address_limit` for one IP address.
    pub fn new(total_limit: usize, per_address_limit: usize) -> Arc<AddressSlots> {
        Arc::new(AddressSlots {
            total_limit,
            per_address_limit,
            per_address: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place for `address`, or says which limit is reached.
    pub fn take(slots: &Arc<AddressSlots>, address: IpAddr) -> Result<Slot, String> {
        let mut per_address = slots.per_address.lock_unpoisoned();
        let total: usize = per_address.values().sum();
        if total >= slots.total_limit {
            return Err(format!("{total} open, the most this node allows"));
        }
        let from_address = per_address.entry(address).or_default();
        if *from_address >= slots.per_address_limit {
            return Err(format!(
                "{from_address} open from {address}, the most this node allows from one address"
            ));
        }
        *from_address += 1;
        Ok(Slot {
            slots: slots.clone(),
            address,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_address = self.slots.per_address.lock_unpoisoned();
        if let Some(count) = per_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                per_address.remove(&self.address);
            }
        }
    }
}

/// Accepts connections on `listener` until `shutdown`, and yields those that
/// complete their handshake within the limits.
pub fn accept(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> ReceiverStream<io::Result<NodeConnection>> {
    let (accepted, incoming) = mpsc::channel(ACCEPTED_CONNECTION_QUEUE);
    let slots = AddressSlots::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                result = listener.accept() => match result {
                    Ok(connection) => connection,
                    Err(error) => {
                        // Out of descriptors, for example: wait rather than spin.
                        tracing::warn!(%error, "could not accept a connection to the node API");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let slot = match AddressSlots::take(&slots, peer.ip()) {
                Ok(slot) => slot,
                Err(reason) => {
                    tracing::warn!(%peer, "refused a connection to the node API: too many connections ({reason})");
                    continue;
                }
            };
            let tls = tls.clone();
            let accepted = accepted.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, tls));
                let stream = tokio::select! {
                    () = shutdown.cancelled() => return,
                    result = handshake => match result {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            tracing::warn!(%peer, %error, "refused a connection to the node API");
                            return;
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "closed a connection to the node API that sent nothing for {HANDSHAKE_TIMEOUT:?}");
                            return;
                        }
                    },
                };
                let local_addr = match &stream {
                    Stream::Plain(stream) => stream.local_addr().ok(),
                    Stream::Tls(stream) => stream.get_ref().0.local_addr().ok(),
                };
                let connection = NodeConnection {
                    stream,
                    info: TcpConnectInfo {
                        local_addr,
                        remote_addr: Some(peer),
                    },
                    _slot: slot,
                };
                let _ = accepted.send(Ok(connection)).await;
            });
        }
    });
    ReceiverStream::new(incoming)
}

async fn handshake(stream: TcpStream, tls: Option<TlsAcceptor>) -> io::Result<Stream> {
    stream.set_nodelay(true)?;
    match tls {
        Some(acceptor) => Ok(Stream::Tls(Box::new(acceptor.accept(stream).await?))),
        None => {
            // Waits for the first byte without taking it.
            let mut first = [0u8; 1];
            if stream.peek(&mut first).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection",
                ));
            }
            Ok(Stream::Plain(stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_show_the_secret_or_the_key_in_debug_output() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = TlsFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            ca: None,
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        let secret = "a secret that must stay hidden";
        let credentials = ClientCredentials::new(
            ClusterKeys::new(vec![crate::config::Secret::new(secret)]),
            Some(&files),
        )
        .unwrap();
        let shown = format!("{credentials:?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(!shown.contains(&key.serialize_pem()[40..80]), "{shown}");
    }
}
