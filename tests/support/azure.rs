//! An Azure Blob Storage emulator for the backup-to-Azure tests: one Azurite
//! blob service per [`AzuriteServer`], on loopback.
//!
//! [`AzuriteServer::start`] runs `azurite-blob` (from the npm package `azurite`,
//! which `.ci/run` installs into `target/azurite`) on a loopback port that was
//! free a moment before, with its workspace and its output (an access log) in a
//! private temporary dir, telemetry off, any API version accepted and unknown
//! headers ignored (`--skipApiVersionCheck --loose`). It waits, at most
//! [`READY_TIMEOUT`], until Azurite answers (an unsigned `List Containers` gets
//! its `403` with `Server: Azurite-Blob`), retrying with a new port when another
//! process took it first.
//!
//! Azurite checks Shared Key signatures with its well-known development account,
//! [`ACCOUNT`] and [`ACCOUNT_KEY`]; [`AzuriteServer::endpoint`] is that account's
//! path-style URL, `http://127.0.0.1:<port>/devstoreaccount1`. Containers are not
//! created on demand, and object_store cannot create one:
//! [`AzuriteServer::create_container`] sends `Create Container` signed here
//! (HMAC-SHA256 from `sha2`, the key decoded with `base64`). Dropping an
//! [`AzuriteServer`] kills the process and removes its dir.
//!
//! A machine without `target/azurite/node_modules/.bin/azurite-blob` makes every
//! test that needs one fail with a message saying how to install it (whether or
//! not `CI` is set): they never pass silently. Tests that use only part of this
//! module include it with `#[allow(dead_code)]`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

/// Azurite's well-known development account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Its key (public: Azurite documents it; it protects nothing).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// How long Azurite may take to answer after it starts (Node loads it in a
/// second or two on an idle machine, more while the tests compile and run).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is checked.
const POLL: Duration = Duration::from_millis(50);
/// How many times a start is retried when Azurite exits at once (its port was
/// taken).
const START_ATTEMPTS: usize = 5;
/// The bound on one HTTP exchange with Azurite from the tests.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// The storage API version the tests' requests name.
const API_VERSION: &str = "2021-08-06";
/// Where `.ci/run` installs Azurite's blob service, relative to the crate's root.
const AZURITE_BLOB: &str = "target/azurite/node_modules/.bin/azurite-blob";

/// A running Azurite blob service, killed on drop.
pub struct AzuriteServer {
    /// The azurite-blob (node) process.
    child: Child,
    /// Its address.
    address: SocketAddr,
    /// The account's endpoint, `http://127.0.0.1:<port>/devstoreaccount1`.
    endpoint: String,
    /// Where its output goes.
    log: PathBuf,
    /// Its workspace and log, removed on drop (after the process is gone).
    _dir: tempfile::TempDir,
}

impl AzuriteServer {
    /// Starts Azurite's blob service and waits until it answers; panics with
    /// its log otherwise.
    pub fn start() -> AzuriteServer {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join(AZURITE_BLOB);
        require_azurite(&binary);
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match AzuriteServer::try_start(&binary) {
                Ok(server) => return server,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "azurite-blob did not start in {START_ATTEMPTS} attempts:\n{}",
            failures.join("\n---\n")
        );
    }

    /// One attempt: `Err` with the log when Azurite exited before answering.
    fn try_start(binary: &Path) -> Result<AzuriteServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("ltxfs-azurite-")
            .tempdir()
            .expect("create a temporary dir for azurite-blob");
        let address = free_loopback_address();
        let workspace = dir.path().join("workspace");
        std::fs::create_dir(&workspace).expect("create azurite-blob's workspace");
        let log = dir.path().join("azurite.log");
        let log_file = File::create(&log).expect("create azurite-blob's log");
        let child = Command::new(binary)
            .arg("--blobHost")
            .arg(address.ip().to_string())
            .arg("--blobPort")
            .arg(address.port().to_string())
            .arg("--location")
            .arg(&workspace)
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone azurite-blob's log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {}: {error}", binary.display()));
        let mut server = AzuriteServer {
            child,
            address,
            endpoint: format!("http://{address}/{ACCOUNT}"),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait().expect("check on azurite-blob") {
                return Err(format!(
                    "azurite-blob exited with {status}:\n{}",
                    server.log()
                ));
            }
            // The Server header tells Azurite from another server that took the port.
            if let Ok((_, head)) = server.request("GET", &format!("/{ACCOUNT}?comp=list"), &[])
                && head
                    .to_ascii_lowercase()
                    .contains("\r\nserver: azurite-blob")
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                panic!(
                    "azurite-blob did not answer within {READY_TIMEOUT:?}:\n{}",
                    server.log()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The account's endpoint, `http://127.0.0.1:<port>/devstoreaccount1`, for
    /// the destination's `endpoint`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Creates the container `name` (3 to 63 lowercase letters, digits and
    /// hyphens) with a request signed with [`ACCOUNT_KEY`]; panics when Azurite
    /// refuses.
    pub fn create_container(&self, name: &str) {
        let date = chrono::DateTime::<chrono::Utc>::from(SystemTime::now())
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        // Shared Key's string to sign: the verb, eleven standard headers (all
        // empty here, Content-Length too since it is 0), the x-ms- headers, and
        // the resource (/<account> then the path, which starts with the account
        // again in path-style URLs) with its query parameters.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n\
             /{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        );
        let key = BASE64
            .decode(ACCOUNT_KEY)
            .expect("the account key is base64");
        let signature = BASE64.encode(hmac_sha256(&key, to_sign.as_bytes()));
        let headers = [
            ("x-ms-date", date.as_str()),
            ("x-ms-version", API_VERSION),
            ("Authorization", &format!("SharedKey {ACCOUNT}:{signature}")),
        ];
        match self.request(
            "PUT",
            &format!("/{ACCOUNT}/{name}?restype=container"),
            &headers,
        ) {
            Ok((201, _)) => {}
            other => panic!(
                "creating the container {name:?} in Azurite failed: {other:?}\n{}",
                self.log()
            ),
        }
    }

    /// The server's log so far, for panic messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|error| format!("(no log: {error})"))
    }

    /// Sends a bodiless request with a one-shot HTTP/1.1 connection and returns
    /// the status code and the whole answer (head and body) as text.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&self.address, HTTP_TIMEOUT)?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
        stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.address);
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes())?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status = answer
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::other(format!("not an HTTP answer: {answer:?}")))?;
        Ok((status, answer))
    }
}

impl Drop for AzuriteServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut padded = [0u8; BLOCK];
    if key.len() > BLOCK {
        padded[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        padded[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(padded.map(|byte| byte ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(padded.map(|byte| byte ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Panics with installation advice when `binary` is missing.
fn require_azurite(binary: &Path) {
    if binary.is_file() {
        return;
    }
    let ci = std::env::var_os("CI").is_some();
    panic!(
        "azurite-blob not found at {}: run `bash .ci/run` (it installs the npm package \
         azurite into target/azurite). {}",
        binary.display(),
        if ci {
            "CI is set: the CI machine must provide azurite-blob."
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
