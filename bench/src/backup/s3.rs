//! A private moto S3 server for `ltxfs bench backup`, and the few plain HTTP
//! requests the benchmark makes to it itself: create the bucket, GET an object.
//!
//! moto's server mode (`moto_server`, from the PyPI package `moto[server]`,
//! which `.ci/run` installs into `target/s3-venv`, as for tests/it/support/s3.rs)
//! runs on a loopback port that was free a moment before, its output going to
//! `<dir>/moto.log`, and is ready once it answers S3's `ListBuckets`
//! (`GET /`); it is started again on another port when it exits at once
//! (another process took the port). It keeps its data in memory and in
//! temporary files, checks no signatures, but refuses requests with no
//! `Authorization` header, so the benchmark's requests carry a well-formed one
//! with a dummy signature. URLs are path-style (`/<bucket>/<key>`).
//!
//! Invariants: dropping a [`Moto`] kills and reaps the process; it also exits
//! by itself if the benchmark dies (the parent-death signal); every request
//! has a timeout.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BackupBenchError;
use crate::BenchError;
use test_support::exit_with_parent;

/// Where `.ci/run` installs moto's server, relative to the workspace's root.
const MOTO_SERVER: &str = "target/s3-venv/bin/moto_server";
/// How often moto is started on a new port when it exits at once.
const START_ATTEMPTS: usize = 5;
/// How long moto may take to answer after it starts (importing moto takes a
/// second or two).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is checked.
const READY_POLL: Duration = Duration::from_millis(50);
/// How long connecting, and each read or write, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The copy buffer of a GET.
const COPY_BUFFER_BYTES: usize = 1 << 20;
/// A SigV4 header moto accepts (it checks none of it).
const AUTHORIZATION: &str = "AWS4-HMAC-SHA256 Credential=testing/20000101/us-east-1/s3/aws4_request, \
                             SignedHeaders=host, Signature=0";

/// A running moto server, killed on drop.
pub(super) struct Moto {
    child: Child,
    address: SocketAddr,
}

impl Moto {
    /// Starts moto with its log in `<base>/moto.log` and waits until it answers.
    pub(super) fn start(base: &Path) -> Result<Moto, BackupBenchError> {
        let binary = moto_binary()?;
        let log = base.join("moto.log");
        let mut problem = String::new();
        for _ in 0..START_ATTEMPTS {
            match Moto::try_start(&binary, &log)? {
                Ok(moto) => return Ok(moto),
                Err(attempt) => problem = attempt,
            }
        }
        Err(BackupBenchError::MotoNotReady {
            problem: format!("{problem}, on each of {START_ATTEMPTS} attempts"),
            log,
        })
    }

    /// One attempt: the outer error is fatal, the inner one says why this
    /// attempt failed in a way another attempt may not.
    fn try_start(binary: &Path, log: &Path) -> Result<Result<Moto, String>, BackupBenchError> {
        let io_error = |action| {
            let path = log.to_path_buf();
            move |cause| BenchError::Io {
                action,
                path,
                cause,
            }
        };
        let address = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(io_error("find a free loopback port for moto, logging to"))?;
        let stdout = File::create(log).map_err(io_error("create the log file"))?;
        let stderr = stdout
            .try_clone()
            .map_err(io_error("create the log file"))?;
        let mut command = Command::new(binary);
        exit_with_parent(&mut command);
        let child = command
            .arg("-H")
            .arg(address.ip().to_string())
            .arg("-p")
            .arg(address.port().to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|cause| BenchError::Spawn {
                binary: binary.to_path_buf(),
                cause,
            })?;
        // From here on, an early return drops the `Moto`, which kills the process.
        let mut moto = Moto { child, address };
        let started = Instant::now();
        loop {
            match moto.child.try_wait() {
                Ok(Some(status)) => return Ok(Err(format!("moto_server exited with {status}"))),
                Ok(None) => {}
                Err(cause) => return Err(io_error("check on moto, logging to")(cause).into()),
            }
            if moto.ready() {
                return Ok(Ok(moto));
            }
            if started.elapsed() >= READY_TIMEOUT {
                return Err(BackupBenchError::MotoNotReady {
                    problem: format!("no answer to GET / within {} s", READY_TIMEOUT.as_secs()),
                    log: log.to_path_buf(),
                });
            }
            std::thread::sleep(READY_POLL);
        }
    }

    /// Whether moto answers `ListBuckets` (the body tells moto from another
    /// server that took the port).
    fn ready(&self) -> bool {
        let mut body = Vec::new();
        request(self.address, "GET", "/", &mut body).is_ok_and(|(status, _)| {
            status == 200 && String::from_utf8_lossy(&body).contains("ListAllMyBucketsResult")
        })
    }

    /// The endpoint, `http://127.0.0.1:<port>`.
    pub(super) fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The process id, to measure its CPU time.
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates the bucket `name`.
    pub(super) fn create_bucket(&self, name: &str) -> Result<(), BackupBenchError> {
        let path = format!("/{name}");
        let mut body = Vec::new();
        match request(self.address, "PUT", &path, &mut body) {
            Ok((200, _)) => Ok(()),
            Ok((status, _)) => Err(s3_error(
                "PUT",
                &path,
                format!("status {status}: {}", String::from_utf8_lossy(&body)),
            )),
            Err(error) => Err(s3_error("PUT", &path, error.to_string())),
        }
    }

    /// Downloads the object `key` of `bucket` into `out`; returns its size.
    pub(super) fn get(
        &self,
        bucket: &str,
        key: &str,
        out: &mut dyn Write,
    ) -> Result<u64, BackupBenchError> {
        let path = format!("/{bucket}/{key}");
        match request(self.address, "GET", &path, out) {
            Ok((200, bytes)) => Ok(bytes),
            Ok((status, _)) => Err(s3_error("GET", &path, format!("status {status}"))),
            Err(error) => Err(s3_error("GET", &path, error.to_string())),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // Its data is the benchmark's alone; errors mean it is already gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s3_error(method: &str, path: &str, problem: String) -> BackupBenchError {
    BackupBenchError::S3 {
        request: format!("{method} {path}"),
        problem,
    }
}

/// moto's server: `LTXFS_MOTO_SERVER` if set, else where `.ci/run` installs it
/// in this checkout.
fn moto_binary() -> Result<PathBuf, BackupBenchError> {
    let path = std::env::var_os("LTXFS_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // This crate is `bench/` in the workspace.
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
            workspace.unwrap_or(Path::new("/")).join(MOTO_SERVER)
        });
    if path.is_file() {
        Ok(path)
    } else {
        Err(BackupBenchError::MotoMissing { path })
    }
}

/// Sends `method path` (no body) to `address` on a one-shot HTTP/1.1
/// connection and copies the answer's body into `out`; returns the status and
/// the body's size. A body with a `Content-Length` must arrive whole; one
/// without runs to the end of the connection; chunked bodies are refused
/// (moto sends none to these requests).
fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    out: &mut dyn Write,
) -> io::Result<(u16, u64)> {
    let mut stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // One write, so the request goes in one segment.
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: {AUTHORIZATION}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed inside the answer's head",
            ));
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push_str(&line);
    }
    let (status, length) = parse_head(&head)?;
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    let mut copied = 0u64;
    loop {
        let want = match length {
            Some(length) if copied >= length => break,
            Some(length) => buffer.len().min((length - copied) as usize),
            None => buffer.len(),
        };
        let read = reader.read(&mut buffer[..want])?;
        if read == 0 {
            if length.is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the body ended after {copied} of {length:?} bytes"),
                ));
            }
            break;
        }
        out.write_all(&buffer[..read])?;
        copied += read as u64;
    }
    Ok((status, copied))
}

/// The status and `Content-Length` (if any) of an answer's head.
fn parse_head(head: &str) -> io::Result<(u16, Option<u64>)> {
    let status = test_support::http::status(head)?;
    let mut length = None;
    for (name, value) in head.lines().skip(1).filter_map(|line| line.split_once(':')) {
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| {
                io::Error::other(format!("a Content-Length that is not a number: {value:?}"))
            })?);
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding")
            && value.eq_ignore_ascii_case("chunked")
        {
            return Err(io::Error::other("a chunked answer"));
        }
    }
    Ok((status, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_give_the_status_and_length() {
        let head = "HTTP/1.1 200 OK\r\nServer: Werkzeug\r\ncontent-length: 42\r\n";
        assert_eq!(parse_head(head).expect("parses"), (200, Some(42)));
        assert_eq!(
            parse_head("HTTP/1.0 403 FORBIDDEN\r\n").expect("parses"),
            (403, None)
        );
        assert!(parse_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n").is_err());
        assert!(parse_head("SSH-2.0-OpenSSH\r\n").is_err());
    }

    #[test]
    fn a_get_copies_exactly_the_body() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let address = listener.local_addr().expect("address");
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut request = [0u8; 1024];
            let read = stream.read(&mut request).expect("read the request");
            let request = String::from_utf8_lossy(&request[..read]).to_string();
            let body = vec![7u8; 3 * COPY_BUFFER_BYTES + 5];
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .expect("write the head");
            stream.write_all(&body).expect("write the body");
            request
        });
        let mut out = Vec::new();
        let (status, bytes) = request(address, "GET", "/b/k", &mut out).expect("request");
        let sent = server.join().expect("server thread");
        assert!(sent.starts_with("GET /b/k HTTP/1.1\r\n"), "{sent}");
        assert!(sent.contains("Authorization: AWS4-HMAC-SHA256"), "{sent}");
        assert_eq!((status, bytes), (200, 3 * COPY_BUFFER_BYTES as u64 + 5));
        assert_eq!(out.len(), 3 * COPY_BUFFER_BYTES + 5);
    }
}
