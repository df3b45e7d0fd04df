//! The one way ltxfs builds a pooled hyper HTTP/1.1 client: the coordinators'
//! client ([`crate::lease::http::HttpClient`]) and the proxy's connections to the
//! application and to other proxies.
//!
//! Every client sets `TCP_NODELAY`, keeps idle keep-alive connections for
//! [`POOL_IDLE_TIMEOUT`] and speaks HTTP/1.1 only. With [`Schemes::HttpAndHttps`]
//! an `https://` URL is reached over TLS (rustls with ring), verifying the server
//! against the Mozilla root certificates built in (webpki-roots), so it works in
//! containers without a system certificate store.
//!
//! Pooled connections belong to the tokio runtime that made them, so a client
//! should be used within one runtime.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Body;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A pooled client sending request bodies of type `B`. Cloning it shares the
/// pool.
pub type PooledClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// The URL schemes a client reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schemes {
    /// `http://` only: an `https://` URL fails to connect.
    Http,
    /// `http://`, and `https://` over TLS.
    HttpAndHttps,
}

/// A client with an empty pool that reaches `schemes` and, when
/// `connect_timeout` is given, gives up connecting after it. Needs no runtime
/// until the first request.
pub fn pooled_client<B>(schemes: Schemes, connect_timeout: Option<Duration>) -> PooledClient<B>
where
    B: Body + Send,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(connect_timeout);
    // The TLS connector hands `https` to rustls and passes `http` through; the
    // TCP connector refuses `https` itself unless TLS is wanted.
    connector.enforce_http(schemes == Schemes::Http);
    // The provider is named: the object_store clients of backups bring rustls's
    // aws-lc-rs provider too, and with two built in rustls has no process-wide
    // default.
    let connector = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(Arc::new(rustls::crypto::ring::default_provider()))
        .expect("ring's provider supports TLS 1.2 and 1.3")
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .build(connector)
}
