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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use percent_encoding::percent_decode_str;
use url::Url;

use super::BackupError;
use super::layout::{self, ObjectName};
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
    /// Whether one listing returns keys in byte order (S3, GCS and Azure do;
    /// a local directory does not), and so visits the folders in
    /// [`layout::folders_in_listing_order`] by itself.
    lists_in_key_order: bool,
    /// The directory of a `file://` destination. A listing fails while it is
    /// missing or not a directory, as one of a missing bucket does; a local
    /// store would list nothing there, and the uploader would take the
    /// destination for an empty one and replace its history with a snapshot.
    local_root: Option<PathBuf>,
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
        let parsed = Url::parse(&url).map_err(|_| invalid("it is not a URL".into()))?;
        let scheme = parsed.scheme();
        let bucket = parsed.host_str().unwrap_or("");
        let path = percent_decode_str(parsed.path())
            .decode_utf8()
            .map_err(|_| invalid("its path is not UTF-8 once decoded".into()))?;
        let prefix = path.trim_matches('/');
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
                let root = parsed.to_file_path().map_err(|()| {
                    invalid("it must name an absolute path, as in `file:///var/backups/db`".into())
                })?;
                std::fs::create_dir_all(&root).map_err(|error| {
                    invalid(format!("cannot create {}: {error}", root.display()))
                })?;
                object_store::local::LocalFileSystem::new_with_prefix(&root)
                    .map(|store| Arc::new(store.with_automatic_cleanup(true)) as _)
            }
            other => {
                return Err(invalid(format!(
                    "unknown scheme `{other}://`; use s3://, gs://, az:// or file://"
                )));
            }
        };
        let store = built.map_err(|error| invalid(redact(&error)))?;
        let local_root = (scheme == "file")
            .then(|| parsed.to_file_path().ok())
            .flatten();
        let prefix = if scheme == "file" { "" } else { prefix };
        Ok(Destination {
            url: url.clone(),
            store,
            prefix: prefix.to_string(),
            lists_in_key_order: scheme != "file",
            local_root,
        })
    }

    /// Checks that the destination answers and the credentials work: lists
    /// (at most one page of) the prefix.
    pub async fn check(&self) -> Result<(), BackupError> {
        self.check_local_root().await?;
        let prefix = self.full_path("");
        let mut listing = self.store.list(prefix.as_ref());
        if let Some(Err(error)) = listing.next().await {
            return Err(self.error("list", error));
        }
        Ok(())
    }

    /// Every object of every database (or of `database`), with names that
    /// parse; anything else under the prefix is skipped with a warning.
    /// Folders are visited in [`layout::folders_in_listing_order`], so
    /// compaction or retention running meanwhile hides no TXID.
    pub async fn list(&self, database: Option<&str>) -> Result<Vec<Listed>, BackupError> {
        self.check_local_root().await?;
        let mut found = Vec::new();
        let prefix = self.full_path(database.unwrap_or(""));
        if self.lists_in_key_order {
            self.list_under(prefix.as_ref(), database, &mut found)
                .await?;
        } else {
            let database_prefixes = match prefix {
                Some(prefix) if database.is_some() => vec![prefix],
                _ => self.database_prefixes().await?,
            };
            for database_prefix in &database_prefixes {
                for folder in layout::folders_in_listing_order() {
                    let folder = database_prefix.clone().join(folder.as_str());
                    self.list_under(Some(&folder), database, &mut found).await?;
                }
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

    /// Fails unless a `file://` destination's directory is there.
    async fn check_local_root(&self) -> Result<(), BackupError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let context = || format!("list the backup directory {}", root.display());
        match tokio::fs::metadata(root).await {
            Ok(metadata) if metadata.is_dir() => Ok(()),
            Ok(_) => Err(BackupError::local(
                context(),
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "it is not a directory"),
            )),
            Err(error) => Err(BackupError::local(context(), error)),
        }
    }

    /// Adds the objects under `prefix` (of `database`, if given) to `found`.
    async fn list_under(
        &self,
        prefix: Option<&ObjectPath>,
        database: Option<&str>,
        found: &mut Vec<Listed>,
    ) -> Result<(), BackupError> {
        let mut listing = self.store.list(prefix);
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
        Ok(())
    }

    /// The folder of each database with objects at this destination.
    async fn database_prefixes(&self) -> Result<Vec<ObjectPath>, BackupError> {
        let listing = self
            .store
            .list_with_delimiter(self.full_path("").as_ref())
            .await
            .map_err(|error| self.error("list", error))?;
        Ok(listing.common_prefixes)
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures_util::stream::BoxStream;
    use object_store::local::LocalFileSystem;
    use object_store::{
        CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
        PutMultipartOptions, PutResult,
    };

    use super::*;
    use crate::backup::layout::{self, ObjectKind, Target};
    use crate::ltx::{Checksum, TxId};

    type Race = Box<dyn FnOnce() + Send>;

    /// Interleaving points of the listings through a [`RacingStore`]: the
    /// race runs once, at point `at`.
    struct Points {
        seen: usize,
        at: usize,
        race: Option<Race>,
    }

    impl Points {
        fn pass(points: &Mutex<Points>) {
            let mut points = points.lock().unwrap();
            if points.seen == points.at
                && let Some(race) = points.race.take()
            {
                race();
            }
            points.seen += 1;
        }
    }

    /// A local store whose listings let a race run before each listing and
    /// after each object listed.
    struct RacingStore {
        inner: Arc<LocalFileSystem>,
        points: Arc<Mutex<Points>>,
    }

    impl fmt::Display for RacingStore {
        fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(formatter, "RacingStore({})", self.inner)
        }
    }

    impl fmt::Debug for RacingStore {
        fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            fmt::Display::fmt(self, formatter)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for RacingStore {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: PutPayload,
            options: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(location, payload, options).await
        }

        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            options: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, options).await
        }

        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> BoxStream<'static, object_store::Result<ObjectPath>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            Points::pass(&self.points);
            let points = self.points.clone();
            self.inner
                .list(prefix)
                .map(move |listed| {
                    Points::pass(&points);
                    listed
                })
                .boxed()
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    fn object(kind: ObjectKind, level: u8, txids: (u64, u64), pre: u64, post: u64) -> ObjectName {
        ObjectName {
            database: "app.db".into(),
            kind,
            level,
            min_txid: TxId(txids.0),
            max_txid: TxId(txids.1),
            epoch: 1,
            pre_apply: Checksum(pre),
            post_apply: Checksum(post),
            timestamp_ms: txids.1 * 1000,
            sha256: [7; 32],
        }
    }

    /// Compaction storing a merged object and deleting its sources while a
    /// restore lists the destination hides none of their TXIDs from the
    /// listing, wherever the race falls (a local directory lists its
    /// folders in no particular order unless told).
    #[tokio::test]
    async fn a_listing_while_compaction_merges_objects_still_reaches_the_newest_txid() {
        const C: u64 = 1 << 63;
        let snapshot = object(ObjectKind::Snapshot, 0, (1, 1), 0, C | 1);
        let sources = [
            object(ObjectKind::Changes, 0, (2, 2), C | 1, C | 2),
            object(ObjectKind::Changes, 0, (3, 3), C | 2, C | 3),
        ];
        let merged = object(ObjectKind::Changes, 1, (2, 3), C | 1, C | 3);
        for database in [Some("app.db"), None] {
            for at in 0.. {
                let dir = tempfile::tempdir().unwrap();
                let root = dir.path().to_path_buf();
                let write = |root: &std::path::Path, name: &ObjectName| {
                    let path = root.join(name.path());
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(path, b"records").unwrap();
                };
                for name in std::iter::once(&snapshot).chain(&sources) {
                    write(&root, name);
                }
                let (race_root, race_sources, race_merged) =
                    (root.clone(), sources.clone(), merged.clone());
                let race: Race = Box::new(move || {
                    write(&race_root, &race_merged);
                    for source in &race_sources {
                        std::fs::remove_file(race_root.join(source.path())).unwrap();
                    }
                });
                let points = Arc::new(Mutex::new(Points {
                    seen: 0,
                    at,
                    race: Some(race),
                }));
                let destination = Destination {
                    url: format!("file://{}", root.display()),
                    store: Arc::new(RacingStore {
                        inner: Arc::new(LocalFileSystem::new_with_prefix(&root).unwrap()),
                        points: points.clone(),
                    }),
                    prefix: String::new(),
                    lists_in_key_order: false,
                    local_root: None,
                };
                let listed = destination.list(database).await.unwrap();
                let names: Vec<ObjectName> = listed.into_iter().map(|listed| listed.name).collect();
                let plan = layout::plan("app.db", &names, Target::Latest).unwrap();
                assert_eq!(
                    plan.objects.last().unwrap().max_txid,
                    TxId(3),
                    "race at point {at} of a listing of {database:?}: {names:?}"
                );
                if points.lock().unwrap().race.is_some() {
                    break;
                }
            }
        }
    }

    /// A `file://` destination whose directory went away, or became a file,
    /// fails to list instead of listing nothing; it lists again once back.
    #[tokio::test]
    async fn a_missing_backup_directory_fails_to_list() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("dest");
        let destination = Destination::open(&crate::config::BackupDestination {
            url: format!("file://{}", root.display()),
            ..Default::default()
        })
        .unwrap();
        assert!(destination.list(None).await.unwrap().is_empty());
        let away = dir.path().join("away");
        std::fs::rename(&root, &away).unwrap();
        let error = destination.list(None).await.unwrap_err();
        assert!(
            error.to_string().contains("list the backup directory"),
            "{error}"
        );
        assert!(destination.check().await.is_err());
        std::fs::write(&root, b"not a directory").unwrap();
        let error = destination.list(Some("app.db")).await.unwrap_err();
        assert!(error.to_string().contains("not a directory"), "{error}");
        std::fs::remove_file(&root).unwrap();
        std::fs::rename(&away, &root).unwrap();
        assert!(destination.list(None).await.unwrap().is_empty());
        destination.check().await.unwrap();
    }
}
