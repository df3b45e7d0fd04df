//! One backup destination: an `object_store` client for its URL and
//! credentials, rooted at its prefix, and the few operations backups need
//! (list a database's objects, put an object once, read one, delete one).
//!
//! Invariants: a destination's `Display` names its URL and nothing secret;
//! errors never carry credentials (object_store's messages name the request,
//! not the keys); every put of a small object is conditional
//! (`PutMode::Create`), so no node overwrites an object another wrote.

use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};

use super::BackupError;
use super::layout::ObjectName;
use crate::config::BackupDestination;

/// How long one request may take before it fails (and the upload loop
/// retries later).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times object_store retries a failed request itself, and for
/// how long: short, since the upload loop retries with its own backoff.
const CLIENT_RETRIES: usize = 2;
const CLIENT_RETRY_TIMEOUT: Duration = Duration::from_secs(15);
/// Objects up to this size go in one conditional put; larger ones (snapshots
/// of large databases) in parts, read from their spool file.
const SINGLE_PUT_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// The size of one part of a multipart upload; at most
/// [`MULTIPART_CONCURRENCY`] are in memory at once.
const MULTIPART_PART_BYTES: usize = 8 * 1024 * 1024;
const MULTIPART_CONCURRENCY: usize = 2;

/// A connected destination.
#[derive(Clone)]
pub struct Destination {
    /// The URL as configured (with no credentials in it).
    url: String,
    store: Arc<dyn ObjectStore>,
    /// The prefix every object name is under (may be empty).
    prefix: String,
}

impl fmt::Display for Destination {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.url)
    }
}

impl fmt::Debug for Destination {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Destination({})", self.url)
    }
}

/// One object found by a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// What its name says.
    pub name: ObjectName,
    /// Its size in bytes.
    pub size: u64,
}

impl Destination {
    /// Builds the client for `config`. Credentials not in the config come from
    /// the environment (`AWS_*`, `GOOGLE_APPLICATION_CREDENTIALS`,
    /// `AZURE_STORAGE_*`). Nothing is sent yet; [`Destination::check`] does.
    pub fn open(config: &BackupDestination) -> Result<Destination, BackupError> {
        let url = config.url.clone();
        let invalid = |reason: String| BackupError::InvalidDestination {
            url: url.clone(),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("it is not a URL".into()))?;
        let (bucket, prefix) = match rest.split_once('/') {
            Some((bucket, prefix)) => (bucket, prefix.trim_matches('/')),
            None => (rest, ""),
        };
        let options = ClientOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_allow_http(true);
        let retry = RetryConfig {
            max_retries: CLIENT_RETRIES,
            retry_timeout: CLIENT_RETRY_TIMEOUT,
            ..RetryConfig::default()
        };
        let built: Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
            "s3" => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(options)
                    .with_retry(retry);
                if let Some(endpoint) = &config.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &config.region {
                    builder = builder.with_region(region);
                }
                if let Some(key) = &config.access_key_id {
                    builder = builder.with_access_key_id(key.expose());
                }
                if let Some(secret) = &config.secret_access_key {
                    builder = builder.with_secret_access_key(secret.expose());
                }
                builder.build().map(|store| Arc::new(store) as _)
            }
            "gs" => {
                let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(options)
                    .with_retry(retry);
                if let Some(path) = &config.service_account {
                    builder = builder.with_service_account_path(path.to_string_lossy());
                }
                if let Some(endpoint) = &config.endpoint {
                    builder = builder.with_base_url(endpoint);
                }
                builder.build().map(|store| Arc::new(store) as _)
            }
            "az" => {
                let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .with_client_options(options)
                    .with_retry(retry);
                if let Some(account) = &config.account_name {
                    builder = builder.with_account(account);
                }
                if let Some(key) = &config.account_key {
                    builder = builder.with_access_key(key.expose());
                }
                if let Some(endpoint) = &config.endpoint {
                    builder = builder
                        .with_endpoint(endpoint.clone())
                        .with_allow_http(true);
                }
                builder.build().map(|store| Arc::new(store) as _)
            }
            "file" => {
                let root = std::path::Path::new(rest);
                std::fs::create_dir_all(root).map_err(|error| {
                    invalid(format!("cannot create {}: {error}", root.display()))
                })?;
                object_store::local::LocalFileSystem::new_with_prefix(root)
                    .map(|store| Arc::new(store.with_automatic_cleanup(true)) as _)
            }
            other => {
                return Err(invalid(format!(
                    "unknown scheme `{other}://`; use s3://, gs://, az:// or file://"
                )));
            }
        };
        let store = built.map_err(|error| invalid(redact(&error)))?;
        let prefix = if scheme == "file" { "" } else { prefix };
        Ok(Destination {
            url: url.clone(),
            store,
            prefix: prefix.to_string(),
        })
    }

    /// Checks that the destination answers and the credentials work: lists
    /// (at most one page of) the prefix.
    pub async fn check(&self) -> Result<(), BackupError> {
        let prefix = self.full_path("");
        let mut listing = self.store.list(prefix.as_ref());
        if let Some(Err(error)) = listing.next().await {
            return Err(self.error("list", error));
        }
        Ok(())
    }

    /// Every object of every database (or of `database`), with names that
    /// parse; anything else under the prefix is skipped with a warning.
    pub async fn list(&self, database: Option<&str>) -> Result<Vec<Listed>, BackupError> {
        let prefix = self.full_path(database.unwrap_or(""));
        let mut listing = self.store.list(prefix.as_ref());
        let mut found = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|error| self.error("list", error))?;
            let relative = self.relative(meta.location.as_ref());
            match ObjectName::parse(relative) {
                Ok(name) if database.is_none_or(|wanted| name.database == wanted) => {
                    found.push(Listed {
                        name,
                        size: meta.size,
                    })
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(destination = %self, %error, "skipping an object"),
            }
        }
        found.sort_by_key(|listed| {
            (
                listed.name.database.clone(),
                listed.name.max_txid,
                listed.name.kind,
            )
        });
        Ok(found)
    }

    /// Puts a small object once. An object of that name already there is
    /// left as it is: names carry the SHA-256, so it holds the same bytes.
    pub async fn put_new(&self, name: &ObjectName, bytes: Bytes) -> Result<(), BackupError> {
        let path = self.object_path(name);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from_bytes(bytes), options)
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(error) => Err(self.error("put", error)),
        }
    }

    /// Uploads an object spooled in `file` (rewound) of `size` bytes: in one
    /// conditional put when it is small, in parts otherwise.
    pub async fn put_spooled(
        &self,
        name: &ObjectName,
        file: std::fs::File,
        size: u64,
    ) -> Result<(), BackupError> {
        if size > SINGLE_PUT_MAX_BYTES {
            return self.put_file(name, file).await;
        }
        let bytes = tokio::task::spawn_blocking(move || {
            let mut file = file;
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).map(|_| bytes)
        })
        .await
        .map_err(|error| BackupError::local("read a spooled object", std::io::Error::other(error)))?
        .map_err(|error| BackupError::local("read a spooled object", error))?;
        self.put_new(name, Bytes::from(bytes)).await
    }

    /// Uploads a large object from `file` in parts, holding at most
    /// `MULTIPART_PART_BYTES * MULTIPART_CONCURRENCY` in memory. Reading the
    /// file is blocking but bounded to one part per call.
    async fn put_file(&self, name: &ObjectName, file: std::fs::File) -> Result<(), BackupError> {
        let path = self.object_path(name);
        let upload = self
            .store
            .put_multipart(&path)
            .await
            .map_err(|error| self.error("start an upload", error))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART_BYTES);
        let mut file = Some(file);
        loop {
            if let Err(error) = writer.wait_for_capacity(MULTIPART_CONCURRENCY).await {
                return Err(self.error("upload a part", error));
            }
            let mut taken = file.take().expect("the file is put back after each read");
            let read = tokio::task::spawn_blocking(move || {
                let mut part = vec![0u8; MULTIPART_PART_BYTES];
                let mut filled = 0;
                while filled < part.len() {
                    match taken.read(&mut part[filled..]) {
                        Ok(0) => break,
                        Ok(count) => filled += count,
                        Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(error) => return (taken, Err(error)),
                    }
                }
                part.truncate(filled);
                (taken, Ok(part))
            })
            .await
            .map_err(|error| BackupError::Local {
                context: "read a spooled snapshot".into(),
                source: std::io::Error::other(error),
            })?;
            file = Some(read.0);
            let part = read.1.map_err(|source| BackupError::Local {
                context: "read a spooled snapshot".into(),
                source,
            })?;
            if part.is_empty() {
                break;
            }
            writer.put(Bytes::from(part));
        }
        writer
            .finish()
            .await
            .map_err(|error| self.error("finish an upload", error))?;
        Ok(())
    }

    /// Reads an object as a stream of byte chunks.
    pub async fn get(
        &self,
        name: &ObjectName,
    ) -> Result<futures_util::stream::BoxStream<'static, Result<Bytes, BackupError>>, BackupError>
    {
        let path = self.object_path(name);
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|error| self.error("get", error))?;
        let destination = self.clone();
        Ok(result
            .into_stream()
            .map(move |chunk| chunk.map_err(|error| destination.error("read", error)))
            .boxed())
    }

    /// Deletes an object; one already gone is no error.
    pub async fn delete(&self, name: &ObjectName) -> Result<(), BackupError> {
        match self.store.delete(&self.object_path(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(self.error("delete", error)),
        }
    }

    fn full_path(&self, relative: &str) -> Option<ObjectPath> {
        let joined = match (self.prefix.is_empty(), relative.is_empty()) {
            (true, true) => return None,
            (true, false) => relative.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{relative}", self.prefix),
        };
        Some(ObjectPath::from(joined))
    }

    fn object_path(&self, name: &ObjectName) -> ObjectPath {
        self.full_path(&name.path())
            .expect("an object name is never empty")
    }

    fn relative<'a>(&self, location: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            return location;
        }
        location
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .unwrap_or(location)
    }

    fn error(&self, operation: &'static str, error: object_store::Error) -> BackupError {
        BackupError::Remote {
            destination: self.url.clone(),
            operation,
            not_found: matches!(error, object_store::Error::NotFound { .. }),
            message: redact(&error),
        }
    }
}

/// object_store's message for `error`, on one line. Its messages name
/// requests and paths, never credentials; signed query strings, which could
/// carry a SAS token, are cut off.
fn redact(error: &object_store::Error) -> String {
    let text = error.to_string().replace('\n', " ");
    match text.find("?sig=").or_else(|| text.find("&sig=")) {
        Some(index) => format!("{}…", &text[..index]),
        None => text,
    }
}
