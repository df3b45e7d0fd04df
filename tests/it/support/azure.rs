//! An Azure Blob Storage emulator for the backup-to-Azure tests: one Azurite
//! blob service per [`AzuriteServer`], on loopback.
//!
//! [`AzuriteServer::start`] runs `azurite-blob` (from the npm package `azurite`,
//! which `.ci/run` installs into `target/azurite`) as an [`Emulator`]: on a free
//! loopback port, with its workspace and its output (an access log) in a
//! private temporary dir, restarted on another port when its port was taken,
//! with telemetry off, any API version accepted and unknown headers ignored
//! (`--skipApiVersionCheck --loose`). It is ready once it answers as Azurite (an
//! unsigned `List Containers` gets its `403` with `Server: Azurite-Blob`).
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
//! not `CI` is set): they never pass silently.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

use crate::support::emulator::{Emulator, Program};
use test_support::http::request;

/// Azurite's well-known development account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// Its key (public: Azurite documents it; it protects nothing).
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The storage API version the tests' requests name.
const API_VERSION: &str = "2021-08-06";
/// Azurite's blob service, where `.ci/run` installs it.
const AZURITE_BLOB: Program = Program {
    name: "azurite-blob",
    binary: "target/azurite/node_modules/.bin/azurite-blob",
    installed_by: "it installs the npm package azurite into target/azurite",
    dir_prefix: "ltxfs-azurite-",
    log_name: "azurite.log",
    args: azurite_args,
    env: &[],
    ready: azurite_ready,
};

/// A running Azurite blob service, killed on drop.
pub struct AzuriteServer {
    /// The azurite-blob (node) process.
    emulator: Emulator,
    /// The account's endpoint, `http://127.0.0.1:<port>/devstoreaccount1`.
    endpoint: String,
}

impl AzuriteServer {
    /// Starts Azurite's blob service and waits until it answers; panics with
    /// its log otherwise.
    pub fn start() -> AzuriteServer {
        let emulator = Emulator::start(&AZURITE_BLOB);
        AzuriteServer {
            endpoint: format!("http://{}/{ACCOUNT}", emulator.address()),
            emulator,
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
        let path = format!("/{ACCOUNT}/{name}?restype=container");
        match request(self.emulator.address(), "PUT", &path, &headers, "") {
            Ok(answer) if answer.status == 201 => {}
            other => panic!(
                "creating the container {name:?} in Azurite failed: {other:?}\n{}",
                self.log()
            ),
        }
    }

    /// The server's log so far, for panic messages.
    pub fn log(&self) -> String {
        self.emulator.log()
    }
}

/// azurite-blob's arguments: its host and port, its workspace (made in `dir`)
/// and its leniencies.
fn azurite_args(address: SocketAddr, dir: &Path) -> Vec<OsString> {
    let workspace = dir.join("workspace");
    std::fs::create_dir(&workspace).expect("create azurite-blob's workspace");
    let mut args: Vec<OsString> = vec![
        "--blobHost".into(),
        address.ip().to_string().into(),
        "--blobPort".into(),
        address.port().to_string().into(),
        "--location".into(),
        workspace.into(),
    ];
    args.extend(["--skipApiVersionCheck", "--loose", "--disableTelemetry"].map(OsString::from));
    args
}

/// Whether Azurite answers an unsigned `List Containers`.
fn azurite_ready(address: SocketAddr) -> bool {
    // The Server header tells Azurite from another server that took the port.
    request(address, "GET", &format!("/{ACCOUNT}?comp=list"), &[], "").is_ok_and(|answer| {
        answer
            .header("server")
            .is_some_and(|server| server.to_ascii_lowercase().starts_with("azurite-blob"))
    })
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
