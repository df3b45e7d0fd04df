//! A small HTTP/1.1 client for the coordinators' HTTP APIs (Consul's, and etcd's
//! JSON gateway).
//!
//! One [`HttpClient`] keeps a pool of keep-alive connections (built by
//! [`crate::http_pool`]); [`HttpClient::request`] sends one request and reads the
//! whole answer, [`HttpClient::open`] waits for the head of an answer whose body
//! is streamed.
//!
//! Invariants:
//! - Every request is bounded in time: connecting, sending and reading the whole
//!   body (for [`HttpClient::open`], the head of a successful answer) must finish
//!   within the caller's `timeout`, or the request fails with
//!   [`HttpError::Timeout`] and its connection is dropped.
//! - Every answer read whole is bounded in size ([`MAX_BODY`]): a larger body is
//!   an error, not an allocation the peer controls.
//! - Nothing here panics on what the network sends; HTTP status codes are returned
//!   to the caller, who decides what they mean.
//! - Dropping the future of a request cancels it (its connection is closed).
//! - `http://` and `https://` URLs ([`HttpClient::new`]). TLS verifies the
//!   server's certificate against built-in root certificates, as Fly.io's Consul
//!   (`FLY_CONSUL_URL`, an `https://` URL) needs.
//!
//! A client's pooled connections belong to the tokio runtime that made them, so a
//! client should be used within one runtime.

use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};

use super::{LeaseError, Unavailability};
use crate::error_chain::error_chain;
use crate::http_pool::{PooledClient, Schemes, pooled_client};

/// The largest response body accepted. Coordinators' answers about one key are a
/// few hundred bytes (Consul caps a value at 512 KiB).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// An HTTP/1.1 client with a connection pool. Cloning it shares the pool.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: PooledClient<Full<Bytes>>,
}

/// The start of an answer whose body may be streamed.
#[derive(Debug)]
pub enum Opened {
    /// A successful (2xx) answer: its body, still to be read.
    Stream(Incoming),
    /// An unsuccessful answer, read whole.
    Answer(HttpResponse),
}

/// A complete answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code, whatever it is.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The whole body (at most [`MAX_BODY`] bytes).
    pub body: Bytes,
}

impl HttpResponse {
    /// The value of header `name` when it is present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// The body as text for error messages: lossy UTF-8, trimmed, at most 200
    /// characters.
    pub fn body_excerpt(&self) -> String {
        excerpt(&self.body)
    }
}

/// `body` as text for error messages: lossy UTF-8, trimmed, at most 200
/// characters.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// Why a request got no complete answer.
///
/// The errors of the HTTP stack are kept whole, and shown with their causes
/// (hyper's own messages name only the step that failed); they are not
/// given as sources, so that a caller flattening the chain shows each once.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The URL does not parse.
    #[error("invalid request: URL {url:?}: {error}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// Why it does not parse.
        error: hyper::http::uri::InvalidUri,
    },
    /// The URL is neither `http://` nor `https://`.
    #[error("invalid request: URL {url:?}: only http:// and https:// URLs are supported")]
    UnsupportedScheme {
        /// The URL as given.
        url: String,
    },
    /// A header name HTTP does not allow.
    #[error("invalid request: header {name:?}: {error}")]
    InvalidHeaderName {
        /// The name as given.
        name: String,
        /// Why it is not allowed.
        error: hyper::header::InvalidHeaderName,
    },
    /// A header value HTTP does not allow.
    #[error("invalid request: value of header {name}: {error}")]
    InvalidHeaderValue {
        /// The header's name.
        name: HeaderName,
        /// Why the value is not allowed.
        error: hyper::header::InvalidHeaderValue,
    },
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connecting or sending failed, or no answer came back.
    #[error("{}", error_chain(.0))]
    Transport(hyper_util::client::legacy::Error),
    /// The answer's body broke off.
    #[error("{}", error_chain(.0.as_ref()))]
    Body(Box<dyn std::error::Error + Send + Sync>),
    /// The answer's body is larger than [`MAX_BODY`].
    #[error("the answer is larger than {MAX_BODY} bytes")]
    BodyTooLarge,
}

impl HttpError {
    /// The lease error for a failed request to `coordinator` ("consul", "etcd") at
    /// `url` (which must not contain credentials).
    pub fn into_lease_error(self, coordinator: &'static str, url: &str) -> LeaseError {
        LeaseError::Unavailable {
            coordinator,
            url: url.to_string(),
            reason: Unavailability::NoAnswer(self),
        }
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client of `http://` and `https://` URLs with an empty pool. Needs no
    /// runtime until the first request.
    pub fn new() -> HttpClient {
        HttpClient::reaching(Schemes::HttpAndHttps, None)
    }

    /// A client of `schemes` that gives up connecting after `connect_timeout`
    /// (when given).
    pub fn reaching(schemes: Schemes, connect_timeout: Option<Duration>) -> HttpClient {
        HttpClient {
            inner: pooled_client(schemes, connect_timeout),
        }
    }

    /// Sends `method url` with `headers` and `body`, and reads the whole answer,
    /// all within `timeout`. Any status code is an answer; only the absence of a
    /// complete answer is an error.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<HttpResponse, HttpError> {
        let request = build_request(method, url, headers, body)?;
        within(timeout, async {
            read_whole(self.send(request).await?).await
        })
        .await
    }

    /// Sends `request` (from [`build_request`]) and waits, within `timeout`, for
    /// the head of the answer; an unsuccessful answer is read whole, a successful
    /// one's body is left to the caller, who bounds its reading.
    pub async fn open(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Opened, HttpError> {
        within(timeout, async {
            let response = self.send(request).await?;
            if response.status().is_success() {
                return Ok(Opened::Stream(response.into_body()));
            }
            Ok(Opened::Answer(read_whole(response).await?))
        })
        .await
    }

    /// Sends `request` and waits for the head of the answer.
    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, HttpError> {
        self.inner
            .request(request)
            .await
            .map_err(HttpError::Transport)
    }
}

/// Runs `exchange`, failing with [`HttpError::Timeout`] when it takes longer than
/// `timeout`.
async fn within<T>(
    timeout: Duration,
    exchange: impl Future<Output = Result<T, HttpError>>,
) -> Result<T, HttpError> {
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout(timeout))?
}

/// Reads the whole of `response`, at most [`MAX_BODY`] bytes of body.
async fn read_whole(response: Response<Incoming>) -> Result<HttpResponse, HttpError> {
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                HttpError::BodyTooLarge
            } else {
                HttpError::Body(error)
            }
        })?
        .to_bytes();
    Ok(HttpResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Checks the URL and headers and assembles the request.
pub fn build_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Request<Full<Bytes>>, HttpError> {
    let uri: Uri = url.parse().map_err(|error| HttpError::InvalidUrl {
        url: url.to_string(),
        error,
    })?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(HttpError::UnsupportedScheme {
            url: url.to_string(),
        });
    }
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|error| {
            HttpError::InvalidHeaderName {
                name: name.to_string(),
                error,
            }
        })?;
        let value =
            HeaderValue::from_str(value).map_err(|error| HttpError::InvalidHeaderValue {
                name: name.clone(),
                error,
            })?;
        request.headers_mut().append(name, value);
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_are_accepted() {
        let refused = |url: &str, header: (&str, &str)| {
            build_request(Method::GET, url, &[header], Bytes::new()).unwrap_err()
        };
        let error = refused("ftp://h/x", ("a", "b"));
        assert!(
            matches!(error, HttpError::UnsupportedScheme { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("https://"), "{error}");
        build_request(Method::GET, "https://h/x", &[], Bytes::new()).unwrap();
        let error = refused("not a url", ("a", "b"));
        assert!(matches!(error, HttpError::InvalidUrl { .. }), "{error}");
        let error = refused("http://h/x", ("a b", "c"));
        assert!(
            matches!(error, HttpError::InvalidHeaderName { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("header \"a b\""), "{error}");
        let error = refused("http://h/x", ("a", "b\nc"));
        assert!(
            matches!(error, HttpError::InvalidHeaderValue { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("value of header a"), "{error}");
        let request = build_request(
            Method::PUT,
            "http://h:1/x?y=z",
            &[("X-A", "b")],
            Bytes::new(),
        )
        .unwrap();
        assert_eq!(request.headers()["x-a"], "b");
        assert_eq!(request.uri().path_and_query().unwrap(), "/x?y=z");
    }

    #[tokio::test]
    async fn an_https_url_is_reached_over_tls_with_the_host_name() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // A server that reads what the client sends first, then hangs up.
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut first = vec![0u8; 512];
            let read = socket.read(&mut first).await.unwrap();
            first.truncate(read);
            first
        });
        let url = format!("https://localhost:{port}/v1/kv/x");
        let error = HttpClient::new()
            .request(Method::GET, &url, &[], Bytes::new(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(error, HttpError::Transport(_)), "{error}");
        let first = server.await.unwrap();
        // A TLS handshake record (0x16) carrying a ClientHello (1), whose server
        // name extension names the host; never the plain-text request.
        assert_eq!(first.first(), Some(&0x16), "{first:?}");
        assert_eq!(first.get(5), Some(&1), "{first:?}");
        assert!(first.windows(9).any(|window| window == b"localhost"));
        assert!(!first.windows(3).any(|window| window == b"GET"));
    }

    #[tokio::test]
    async fn a_closed_port_is_a_transport_error_naming_the_cause() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        drop(listener);
        let error = HttpClient::new()
            .request(Method::GET, &url, &[], Bytes::new(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(error, HttpError::Transport(_)), "{error}");
        assert!(
            error.to_string().to_lowercase().contains("refused"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let error = HttpClient::new()
            .request(
                Method::GET,
                &url,
                &[],
                Bytes::new(),
                Duration::from_millis(200),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, HttpError::Timeout(_)), "{error}");
        drop(listener);
    }
}
