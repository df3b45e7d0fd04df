//! The `ltxfs.yml` configuration file: finding it, reading it, and checking
//! it.
//!
//! ltxfs is a successor to LiteFS, and a LiteFS user moves over by renaming
//! `litefs.yml` to `ltxfs.yml`. So every key that LiteFS has and ltxfs
//! supports keeps LiteFS's name, value syntax, default and meaning; the few
//! deliberate differences are listed below. LiteFS keys that ltxfs does not
//! support (LiteFS Cloud's `backup.type`, `tracing`, the proxy's HTTP timeouts, ...) are
//! rejected with an error that says so, rather than as unknown keys.
//!
//! # Reading a file
//!
//! [`load`] picks the file: the path given with `--config` if any (an error
//! if it does not exist), else `./ltxfs.yml`, else `/etc/ltxfs.yml`, else no
//! file at all, in which case [`Config::default`] applies: a single-node
//! primary. [`parse`] reads text. Both run three stages:
//!
//! 1. Environment variables are expanded in the raw text (unless turned
//!    off): `$NAME`, `${NAME}`, LiteFS's `${NAME == 'value'}` comparisons,
//!    and `$$` for a literal `$`. See the `env` submodule for the rules.
//! 2. The YAML is read strictly: an unknown key, a value of the wrong type,
//!    a malformed duration or a badly quoted `exec` command is an error that
//!    names the key and the line.
//! 3. [`Config::validate`] checks the settings together, such as
//!    `lease.type: consul` requiring `lease.consul.url`.
//!
//! Invariants: a [`Config`] returned by [`parse`] or [`load`] has passed
//! [`Config::validate`]; nothing in this module panics on any input; every
//! error names the file (when there is one), the line (when it can be
//! known) and the key.
//!
//! # Value syntax
//!
//! - Durations use Go's syntax, as in LiteFS: `10s`, `5m`, `1h30m`, `250ms`.
//!   A bare `0` means zero; any other bare number is rejected (in LiteFS it
//!   would silently mean nanoseconds).
//! - Booleans accept `true`/`false` and the YAML 1.1 words LiteFS's YAML
//!   library accepts: `yes`/`no`, `on`/`off`, `y`/`n`.
//! - A key with an empty value (`hostname:`) means the default, and an empty
//!   string counts as not set, as in LiteFS. This is what makes
//!   `hostname: "${HOSTNAME}"` harmless when the variable is unset.
//!
//! # Differences from LiteFS
//!
//! - `lease.type: etcd`, `proxy.mode`, `proxy.db` as a list,
//!   `data.max-size` and the `backup` section (object storage; LiteFS's
//!   was LiteFS Cloud) are ltxfs additions.
//! - `proxy.max-lag` has no default (LiteFS: 10s); `0` also means no bound.
//! - There is no `~/litefs.yml`-style search in the home directory.
//! - `$$` is a literal `$` (Go expands it to an empty string), and malformed
//!   `${...}` references are errors instead of being dropped silently.
//! - `exec` command lines reject arguments that are shell operators (`&&`,
//!   `|`, `>`, ...) instead of passing them to the program as text.

mod env;
mod error;
mod locate;
mod raw;
mod validate;
mod values;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
pub use values::{ValueError, parse_byte_size, parse_duration, split_command_line};

use env::Expanded;
use error::{parse_error_from_serde, with_unset_variable_note};
use raw::{Choice, Choices, Flag, GoDuration, RawConfig};

/// The configuration file's name, in the current directory and in `/etc`.
pub const CONFIG_FILE_NAME: &str = "ltxfs.yml";

/// The LiteFS file name, looked for only to tell the user to rename it.
const LITEFS_CONFIG_FILE_NAME: &str = "litefs.yml";

/// Default for `data.retention`, as in LiteFS.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(10 * 60);
/// Default for `data.retention-monitor-interval`, as in LiteFS.
pub const DEFAULT_RETENTION_MONITOR_INTERVAL: Duration = Duration::from_secs(60);
/// Default for `lease.reconnect-delay`, as in LiteFS.
pub const DEFAULT_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// Default for `lease.demote-delay`, as in LiteFS.
pub const DEFAULT_DEMOTE_DELAY: Duration = Duration::from_secs(10);
/// Default for `lease.consul.ttl`, as in LiteFS; also the least Consul accepts.
pub const DEFAULT_CONSUL_TTL: Duration = Duration::from_secs(10);
/// Default for `lease.consul.lock-delay`, as in LiteFS.
pub const DEFAULT_CONSUL_LOCK_DELAY: Duration = Duration::from_secs(1);
/// Default for `lease.etcd.ttl`, chosen to match the Consul default.
pub const DEFAULT_ETCD_TTL: Duration = Duration::from_secs(10);
/// Default for `http.addr` when the config names other nodes (a coordinator's
/// lease, `lease.advertise-url`, or a node that is not a candidate), as in
/// LiteFS: port 20202 on every interface.
pub const DEFAULT_HTTP_ADDR: &str = ":20202";
/// Default for `http.addr` of a single node (no other node named): the loopback
/// interface on a port the kernel picks, recorded in the data dir's
/// [`API_URL_FILE`], so nothing off the machine can reach it and two such
/// mounts never collide.
pub const DEFAULT_LOCAL_HTTP_ADDR: &str = "127.0.0.1:0";
/// The file in the data dir where a running node records its API's URL.
pub const API_URL_FILE: &str = "api-url";
/// The environment variable that sets the cluster secret when the config
/// names none (`http.secret`).
pub const SECRET_ENV: &str = "LTXFS_SECRET";
/// The fewest characters a cluster secret may have.
pub const MIN_SECRET_LEN: usize = 16;
/// Default for `backup.sync-interval`.
pub const DEFAULT_BACKUP_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Default for `backup.snapshot-interval`.
pub const DEFAULT_BACKUP_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
/// The most compaction levels `backup.compaction-windows` may name.
pub const MAX_BACKUP_COMPACTION_WINDOWS: usize = 9;
/// Default for `backup.compaction-windows`.
pub const DEFAULT_BACKUP_COMPACTION_WINDOWS: [Duration; 3] = [
    Duration::from_secs(10),
    Duration::from_secs(5 * 60),
    Duration::from_secs(60 * 60),
];
/// Default for `backup.retention`.
pub const DEFAULT_BACKUP_RETENTION: Duration = Duration::from_secs(72 * 60 * 60);
/// Default for `proxy.primary-redirect-timeout`, as in LiteFS.
pub const DEFAULT_PRIMARY_REDIRECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The whole `ltxfs.yml` configuration, with defaults filled in.
///
/// `Config::default()` is what runs when there is no file: a single-node
/// primary (`lease.type: static`, `lease.candidate: true`) with LiteFS's
/// defaults. Fields are public so that command-line flags can override them;
/// call [`Config::validate`] again after changing them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `exit-on-error`: exit the process when a fatal error occurs at
    /// runtime instead of staying up for debugging. Default `true`, as in
    /// LiteFS.
    pub exit_on_error: bool,
    /// `skip-sync`: start the `exec` commands without waiting to become
    /// primary or to catch up with the primary. Default `false`.
    pub skip_sync: bool,
    /// `strict-verify`: verify database checksums after every transaction
    /// (slow; for debugging). Default `false`.
    pub strict_verify: bool,
    /// `exec`: commands to run once the node is ready, in order. Every
    /// command but the last runs to completion first (migrations, for
    /// example); the last one is the application, which ltxfs supervises.
    /// Default: none. A `-- CMD ARGS...` on the command line replaces it;
    /// see [`ExecCommand::from_argv`].
    pub exec: Vec<ExecCommand>,
    /// `fuse`: the mount.
    pub fuse: FuseConfig,
    /// `data`: where and how long internal data is kept.
    pub data: DataConfig,
    /// `lease`: how the primary is chosen.
    pub lease: LeaseConfig,
    /// `http`: the API server other nodes talk to.
    pub http: HttpConfig,
    /// `replication`.
    pub replication: ReplicationConfig,
    /// `proxy`: the optional HTTP proxy in front of the application.
    pub proxy: ProxyConfig,
    /// `log`: log output.
    pub log: LogConfig,
    /// `backup` (ltxfs only): continuous backups to object storage.
    pub backup: BackupConfig,
}

/// A secret from the config (a key or a password). Its `Debug` form never
/// shows it, so it stays out of logs and error messages.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Secret(\"***\")")
    }
}

/// The `backup` section: where and how often the primary ships its change sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupConfig {
    /// `backup.destinations`: every destination receives everything. Empty
    /// means backups are off.
    pub destinations: Vec<BackupDestination>,
    /// `backup.sync-interval`: the most a committed transaction waits before
    /// its upload starts. Default 1 second.
    pub sync_interval: Duration,
    /// `backup.snapshot-interval`: how often a full snapshot is uploaded.
    /// Default 24 hours.
    pub snapshot_interval: Duration,
    /// `backup.compaction-windows`: the time windows of the compaction
    /// levels, shortest first. Once a window of level N has passed, the
    /// objects of lower levels whose last commit falls in it are merged into
    /// one, so a restore reads few objects. Default `[10s, 5m, 1h]`.
    pub compaction_windows: Vec<Duration>,
    /// `backup.retention`: the point-in-time restore window; older objects
    /// are deleted. Default 72 hours.
    pub retention: Duration,
    /// `backup.restore-on-boot`: a primary with no data anywhere restores the
    /// backup before it accepts writes. Default `false`.
    pub restore_on_boot: bool,
    /// `backup.encryption`: client-side encryption of the objects.
    pub encryption: BackupEncryption,
}

/// The `backup.encryption` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupEncryption {
    /// `age-recipients`: age X25519 public keys (`age1...`) every object is
    /// encrypted to. Empty means objects are not encrypted.
    pub age_recipients: Vec<String>,
    /// `age-identity-file`: the private keys restore-on-boot (and `ltxfs
    /// restore --config`) open objects with.
    pub age_identity_file: Option<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            destinations: Vec::new(),
            sync_interval: DEFAULT_BACKUP_SYNC_INTERVAL,
            snapshot_interval: DEFAULT_BACKUP_SNAPSHOT_INTERVAL,
            compaction_windows: DEFAULT_BACKUP_COMPACTION_WINDOWS.to_vec(),
            retention: DEFAULT_BACKUP_RETENTION,
            restore_on_boot: false,
            encryption: BackupEncryption::default(),
        }
    }
}

/// One entry of `backup.destinations`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupDestination {
    /// `url`: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix` or `file:///absolute/path`. Required.
    pub url: String,
    /// `endpoint`: an S3-compatible service's URL (Tigris, MinIO, ...).
    pub endpoint: Option<String>,
    /// `region`: the S3 region.
    pub region: Option<String>,
    /// `access-key-id` (S3); else `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<Secret>,
    /// `secret-access-key` (S3); else `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<Secret>,
    /// `service-account` (GCS): a service account key file; else
    /// `GOOGLE_APPLICATION_CREDENTIALS`.
    pub service_account: Option<PathBuf>,
    /// `account-name` (Azure); else `AZURE_STORAGE_ACCOUNT_NAME`.
    pub account_name: Option<String>,
    /// `account-key` (Azure); else `AZURE_STORAGE_ACCOUNT_KEY`.
    pub account_key: Option<Secret>,
}

/// One command of `exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecCommand {
    /// The program and its arguments; never empty in a validated config.
    pub argv: Vec<String>,
    /// `if-candidate`: run this command only on a node that can become
    /// primary (`lease.candidate: true`). Typically set on migrations.
    /// Default `false`.
    pub if_candidate: bool,
}

/// The `fuse` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FuseConfig {
    /// `fuse.dir`: the mount point applications open databases in. No
    /// default here; when unset, it comes from the command line.
    pub dir: Option<PathBuf>,
    /// `fuse.allow-other`: let users other than the mounting one use the
    /// mount (needs `user_allow_other` in `/etc/fuse.conf`). Default `false`.
    pub allow_other: bool,
    /// `fuse.debug`: log every FUSE call (very verbose). Default `false`.
    pub debug: bool,
    /// `fuse.locks` (ltxfs only): who serves SQLite's file locks on the mount.
    /// Default [`FuseLocks::Kernel`].
    pub locks: FuseLocks,
}

/// Who serves the `fcntl` locks SQLite takes on the mount's files
/// (`fuse.locks`, ltxfs only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FuseLocks {
    /// `kernel`: the kernel arbitrates them, as on any local filesystem; a
    /// lock call costs what it costs natively. The default.
    #[default]
    Kernel,
    /// `ltxfs`: every lock call is a request to ltxfs, which serves it from
    /// a table of its own.
    Ltxfs,
}

impl Choices for FuseLocks {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("kernel", Self::Kernel), ("ltxfs", Self::Ltxfs)];
}

/// The `data` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataConfig {
    /// `data.dir`: where databases and transaction (LTX) files are stored.
    /// No default here; when unset, the caller picks a directory next to
    /// the mount point.
    pub dir: Option<PathBuf>,
    /// `data.compress`: compress stored transaction files. Default `true`.
    pub compress: bool,
    /// `data.retention`: how long transaction files are kept for replicas
    /// to catch up (the latest is always kept). Default 10 minutes.
    pub retention: Duration,
    /// `data.retention-monitor-interval`: how often old transaction files
    /// are removed. Default 1 minute; never zero in a validated config.
    pub retention_monitor_interval: Duration,
    /// `data.max-size` (ltxfs only): an upper bound in bytes on retained
    /// transaction files, enforced in addition to `retention`. Default:
    /// no bound.
    pub max_size: Option<u64>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: None,
            compress: true,
            retention: DEFAULT_RETENTION,
            retention_monitor_interval: DEFAULT_RETENTION_MONITOR_INTERVAL,
            max_size: None,
        }
    }
}

/// How the primary node is chosen (`lease.type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeaseType {
    /// `static`: the node with `lease.candidate: true` is always the primary;
    /// replicas reach it at `lease.advertise-url`. The default.
    #[default]
    Static,
    /// `consul`: nodes compete for a Consul lock; the primary can move.
    Consul,
    /// `etcd` (ltxfs only): nodes compete for an etcd lease.
    Etcd,
}

impl Choices for LeaseType {
    const CHOICES: &'static [(&'static str, Self)] = &[
        ("static", Self::Static),
        ("consul", Self::Consul),
        ("etcd", Self::Etcd),
    ];
}

/// The `lease` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// `lease.type`. Default [`LeaseType::Static`].
    pub lease_type: LeaseType,
    /// `lease.hostname`: the name other nodes and the proxy use for this
    /// node. Default: none (the OS host name is used at runtime).
    pub hostname: Option<String>,
    /// `lease.advertise-url`: the URL of this node's API for other nodes;
    /// in a static lease, the primary's URL. Default: none (derived from the
    /// host name and `http.addr` at runtime).
    pub advertise_url: Option<String>,
    /// `lease.candidate`: whether this node may become primary. Default
    /// `true`.
    pub candidate: bool,
    /// `lease.promote`: a candidate takes the primary role automatically once
    /// it has caught up. Default `false`.
    pub promote: bool,
    /// `lease.reconnect-delay`: the wait before reconnecting to the primary
    /// or trying to become primary after a disconnect. Default 1 second.
    pub reconnect_delay: Duration,
    /// `lease.demote-delay`: the wait after a forced demotion before trying
    /// to become primary again. Default 10 seconds.
    pub demote_delay: Duration,
    /// `lease.consul`: used when `lease_type` is Consul.
    pub consul: ConsulConfig,
    /// `lease.etcd`: used when `lease_type` is etcd.
    pub etcd: EtcdConfig,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            lease_type: LeaseType::Static,
            hostname: None,
            advertise_url: None,
            candidate: true,
            promote: false,
            reconnect_delay: DEFAULT_RECONNECT_DELAY,
            demote_delay: DEFAULT_DEMOTE_DELAY,
            consul: ConsulConfig::default(),
            etcd: EtcdConfig::default(),
        }
    }
}

/// The `lease.consul` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsulConfig {
    /// `lease.consul.url`: the Consul API URL, possibly with a token and a
    /// key prefix (`https://:TOKEN@host/prefix`). Required for Consul.
    pub url: Option<String>,
    /// `lease.consul.key`: the lock key, unique per cluster. Required for
    /// Consul.
    pub key: Option<String>,
    /// `lease.consul.ttl`: how long the lease lives without renewal.
    /// Default 10 seconds; Consul accepts 10 seconds to 24 hours.
    pub ttl: Duration,
    /// `lease.consul.lock-delay`: how long after a lease expires before
    /// another node may take it. Default 1 second.
    pub lock_delay: Duration,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        Self {
            url: None,
            key: None,
            ttl: DEFAULT_CONSUL_TTL,
            lock_delay: DEFAULT_CONSUL_LOCK_DELAY,
        }
    }
}

/// The `lease.etcd` section (ltxfs only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `lease.etcd.endpoints`: etcd client URLs (a string or a list).
    /// Required for etcd.
    pub endpoints: Vec<String>,
    /// `lease.etcd.key`: the lease key, unique per cluster. Required for etcd.
    pub key: Option<String>,
    /// `lease.etcd.ttl`: the lease time-to-live, a whole number of seconds.
    /// Default 10 seconds.
    pub ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            key: None,
            ttl: DEFAULT_ETCD_TTL,
        }
    }
}

/// The `http` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// `http.addr`: the API server's listen address, `[host]:port`. Default
    /// [`DEFAULT_HTTP_ADDR`] when the config names other nodes, else
    /// [`DEFAULT_LOCAL_HTTP_ADDR`].
    pub addr: String,
    /// `http.secret`, or `http.secrets` (for a rotation), or the
    /// [`SECRET_ENV`] variable: the cluster secret every call of the node API
    /// proves it knows. The first signs; all are accepted. Empty: the API is
    /// open.
    pub secrets: Vec<Secret>,
    /// `http.tls`: serve the node API over TLS (mutual with `ca`).
    pub tls: Option<TlsFiles>,
    /// `http.metrics-secret`: `GET /metrics` needs `Authorization: Bearer
    /// <secret>` too. Default false.
    pub metrics_secret: bool,
    /// `http.accept-unsigned`: while a rolling deploy turns the secret on (or
    /// off), also accept calls and answers of nodes without it. Default false.
    pub accept_unsigned: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_LOCAL_HTTP_ADDR.to_owned(),
            secrets: Vec::new(),
            tls: None,
            metrics_secret: false,
            accept_unsigned: false,
        }
    }
}

/// `http.tls`: the node's certificate and key, and the CA of its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `http.tls.cert`: PEM certificate chain of this node (server and client).
    pub cert: PathBuf,
    /// `http.tls.key`: PEM private key of this node.
    pub key: PathBuf,
    /// `http.tls.ca`: PEM CA certificates. Peers must present a certificate
    /// signed by one (mutual TLS), and nodes verify the primary against them.
    /// Without it, clients verify servers with the web's public roots and the
    /// server asks for no client certificate.
    pub ca: Option<PathBuf>,
}

impl Config {
    /// Whether the config names other nodes: a coordinator's lease, an
    /// advertised URL, or a node that is not a candidate (a static replica).
    pub fn names_other_nodes(&self) -> bool {
        self.lease.lease_type != LeaseType::Static
            || self.lease.advertise_url.is_some()
            || !self.lease.candidate
    }
}

/// The `replication` section (ltxfs only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// `replication.synchronous`: a commit on the primary returns to the
    /// application only once a replica has it (while a replica is connected).
    /// Default false.
    pub synchronous: bool,
}

/// How the proxy sends a write that reaches a replica to the primary
/// (`proxy.mode`, ltxfs only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyMode {
    /// `replay`: answer with a `fly-replay` header so that Fly.io's edge
    /// replays the request on the primary, as LiteFS does. The default.
    #[default]
    Replay,
    /// `forward`: forward the request to the primary over the network.
    Forward,
}

impl Choices for ProxyMode {
    const CHOICES: &'static [(&'static str, Self)] =
        &[("replay", Self::Replay), ("forward", Self::Forward)];
}

/// The `proxy` section. The proxy is enabled when any of `addr`, `target`
/// or `db` is set, and then all three are required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyConfig {
    /// `proxy.addr`: the proxy's listen address, `[host]:port`. Default: none.
    pub addr: Option<String>,
    /// `proxy.target`: the application's `host:port`. Default: none.
    pub target: Option<String>,
    /// `proxy.db`: the database(s) whose transaction ID the proxy tracks for
    /// read-your-writes consistency; a string or a list. Default: none.
    pub db: Vec<String>,
    /// `proxy.debug`: log every proxied request. Default `false`.
    pub debug: bool,
    /// `proxy.passthrough`: path globs (`*` is the only wildcard) sent to
    /// the application as is, without consistency handling. Default: none.
    pub passthrough: Vec<String>,
    /// `proxy.always-forward`: path globs whose read requests are still sent
    /// to the primary. Default: none.
    pub always_forward: Vec<String>,
    /// `proxy.max-lag`: the replication lag above which the proxy's health
    /// check fails. Default: no bound (LiteFS: 10 seconds); `0` also means
    /// no bound.
    pub max_lag: Option<Duration>,
    /// `proxy.primary-redirect-timeout`: how long a write waits for a known
    /// primary. Default 5 seconds.
    pub primary_redirect_timeout: Duration,
    /// `proxy.mode`. Default (`None`): [`ProxyMode::Replay`] on Fly.io (where
    /// `FLY_APP_NAME` is set), [`ProxyMode::Forward`] elsewhere; see
    /// [`ProxyConfig::mode_in`].
    pub mode: Option<ProxyMode>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            addr: None,
            target: None,
            db: Vec::new(),
            debug: false,
            passthrough: Vec::new(),
            always_forward: Vec::new(),
            max_lag: None,
            primary_redirect_timeout: DEFAULT_PRIMARY_REDIRECT_TIMEOUT,
            mode: None,
        }
    }
}

impl ProxyConfig {
    /// Whether the proxy should run. In a validated config this implies that
    /// `addr`, `target` and `db` are all set.
    pub fn is_enabled(&self) -> bool {
        self.addr.is_some() || self.target.is_some() || !self.db.is_empty()
    }

    /// The mode in effect: the configured one, else replay on Fly.io
    /// (`fly_app_name` is `FLY_APP_NAME`) and forward elsewhere.
    pub fn mode_in(&self, fly_app_name: Option<&str>) -> ProxyMode {
        self.mode.unwrap_or(match fly_app_name {
            Some(name) if !name.is_empty() => ProxyMode::Replay,
            _ => ProxyMode::Forward,
        })
    }
}

/// Log line format (`log.format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `text`: human-readable lines. The default.
    #[default]
    Text,
    /// `json`: one JSON object per line.
    Json,
}

impl Choices for LogFormat {
    const CHOICES: &'static [(&'static str, Self)] = &[("text", Self::Text), ("json", Self::Json)];
}

/// The `log` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogConfig {
    /// `log.format`. Default [`LogFormat::Text`].
    pub format: LogFormat,
    /// `log.debug`: include debug messages. Default `false`.
    pub debug: bool,
    /// `log.timestamp`: start each line with a timestamp. Default `false`,
    /// as in LiteFS, because service managers usually add one.
    pub timestamp: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            exit_on_error: true,
            skip_sync: false,
            strict_verify: false,
            exec: Vec::new(),
            fuse: FuseConfig::default(),
            data: DataConfig::default(),
            lease: LeaseConfig::default(),
            http: HttpConfig::default(),
            replication: ReplicationConfig::default(),
            proxy: ProxyConfig::default(),
            log: LogConfig::default(),
            backup: BackupConfig::default(),
        }
    }
}

impl Config {
    /// Checks the settings together: required companions, ranges, address
    /// syntax and conflicts. Returns the first problem as
    /// [`ConfigError::Invalid`] naming the key and what to do; file and line
    /// are filled in only when called through [`parse`] or [`load`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        match validate::first_problem(self) {
            None => Ok(()),
            Some(problem) => Err(ConfigError::Invalid {
                file: None,
                line: None,
                key: problem.key,
                message: problem.message,
            }),
        }
    }
}

impl ExecCommand {
    /// Builds the command given after `--` on the command line
    /// (`ltxfs mount -- myapp -addr :8081`). The arguments are used exactly
    /// as given, with no further splitting or quoting; the command runs
    /// unconditionally (`if_candidate` is false).
    pub fn from_argv<S: AsRef<str>>(argv: &[S]) -> Result<Self, ConfigError> {
        let argv: Vec<String> = argv.iter().map(|arg| arg.as_ref().to_owned()).collect();
        match argv.first() {
            Some(program) if !program.is_empty() => Ok(Self {
                argv,
                if_candidate: false,
            }),
            _ => Err(ConfigError::Invalid {
                file: None,
                line: None,
                key: "exec".to_owned(),
                message: "no program follows `--` on the command line; write the program and \
                          its arguments after `--`, or leave `--` out"
                    .to_owned(),
            }),
        }
    }
}

/// A configuration file that was found and read, or the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedConfig {
    /// The validated configuration.
    pub config: Config,
    /// The absolute path of the file it came from, or `None` when no file
    /// was found and the defaults apply.
    pub path: Option<PathBuf>,
    /// Things the user should hear about, for the caller to log once logging is
    /// set up (the config decides how logging is set up, so it cannot log itself).
    pub warnings: Vec<String>,
}

/// Looks up an environment variable by name; `None` means unset.
pub type EnvLookup = dyn Fn(&str) -> Option<String>;

/// Parses configuration text, expanding environment variables from the
/// process environment first when `expand_env` is true, and validates it.
pub fn parse(text: &str, expand_env: bool) -> Result<Config, ConfigError> {
    if expand_env {
        parse_with_env(text, Some(&process_env))
    } else {
        parse_with_env(text, None)
    }
}

/// Like [`parse`], but variables are looked up with `env` (no expansion
/// when `None`). This lets tests and tools supply an environment without
/// changing the process's.
pub fn parse_with_env(text: &str, env: Option<&EnvLookup>) -> Result<Config, ConfigError> {
    // Editors on Windows may add a byte order mark; it is not part of a key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let expanded = match env {
        Some(lookup) => env::expand(text, lookup).map_err(|error| ConfigError::Parse {
            file: None,
            line: Some(error.line),
            key: None,
            message: error.message,
        })?,
        None => Expanded::unchanged(text),
    };
    for (line, name) in &expanded.unset_variables {
        tracing::debug!(line, variable = %name, "environment variable is not set; expanded to an empty string");
    }

    // `Option` makes a document that is only `~` or `null` mean "no settings".
    let raw: Option<RawConfig> = serde_norway::from_str(&expanded.text)
        .map_err(|error| parse_error_from_serde(&error, &expanded))?;
    let raw = raw.unwrap_or_default();
    if let Some(http) = &raw.http
        && http.secret.is_some()
        && http.secrets.is_some()
    {
        return Err(ConfigError::Invalid {
            file: None,
            line: locate::locate_key(&expanded.text, "http.secrets")
                .map(|line| expanded.original_line(line)),
            key: "http.secrets".to_string(),
            message: "set either http.secret or http.secrets (a list, for a rotation), not both"
                .to_string(),
        });
    }
    let mut config = raw.into_config();
    // The secret may come from the environment alone; taken before validation,
    // which checks the settings that need one.
    if config.http.secrets.is_empty()
        && let Some(secret) = env
            .and_then(|lookup| lookup(SECRET_ENV))
            .filter(|value| !value.is_empty())
    {
        config.http.secrets = vec![Secret(secret)];
    }
    if config.http.addr.is_empty() {
        config.http.addr = if config.names_other_nodes() {
            DEFAULT_HTTP_ADDR
        } else {
            DEFAULT_LOCAL_HTTP_ADDR
        }
        .to_string();
    }

    if let Some(problem) = validate::first_problem(&config) {
        let line = locate::locate_key(&expanded.text, &problem.key)
            .map(|line| expanded.original_line(line));
        return Err(ConfigError::Invalid {
            file: None,
            line,
            message: with_unset_variable_note(problem.message, line, &expanded),
            key: problem.key,
        });
    }
    Ok(config)
}

/// Expands environment variable references in `text` as [`parse`] does,
/// looking them up with `env`; useful to show the effective file.
pub fn expand_env_vars(text: &str, env: &EnvLookup) -> Result<String, ConfigError> {
    env::expand(text, env)
        .map(|expanded| expanded.text)
        .map_err(|error| ConfigError::Parse {
            file: None,
            line: Some(error.line),
            key: None,
            message: error.message,
        })
}

/// Looks a variable up in the process environment. A value that is not
/// valid UTF-8 is converted lossily rather than treated as unset.
fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| value.to_string_lossy().into_owned())
}

/// The files [`load`] tries, in order, when no path is given:
/// `./ltxfs.yml`, then `/etc/ltxfs.yml`.
pub fn default_search_paths() -> Vec<PathBuf> {
    vec![
        PathBuf::from(CONFIG_FILE_NAME),
        Path::new("/etc").join(CONFIG_FILE_NAME),
    ]
}

/// Finds, reads and validates the configuration.
///
/// With `explicit` (from `--config`), only that file is read, and a missing
/// file is [`ConfigError::NotFound`]. Otherwise the [default search
/// paths](default_search_paths) are tried in order; the first that exists is
/// read, and when none exists the defaults apply
/// ([`LoadedConfig::path`] is `None`). A file that exists but cannot be read
/// is an error rather than skipped.
pub fn load(explicit: Option<&Path>, expand_env: bool) -> Result<LoadedConfig, ConfigError> {
    load_from(explicit, &default_search_paths(), expand_env)
}

/// [`load`] with the list of files to search given explicitly, for tests and
/// embedders. `search_paths` is ignored when `explicit` is given.
pub fn load_from(
    explicit: Option<&Path>,
    search_paths: &[PathBuf],
    expand_env: bool,
) -> Result<LoadedConfig, ConfigError> {
    if let Some(path) = explicit {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ConfigError::NotFound {
                    path: path.to_owned(),
                }
            } else {
                ConfigError::Read {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        return parse_file(path, &text, expand_env).and_then(with_secret_from_env);
    }

    for candidate in search_paths {
        match std::fs::read_to_string(candidate) {
            Ok(text) => {
                return parse_file(candidate, &text, expand_env).and_then(with_secret_from_env);
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(ConfigError::Read {
                    path: absolute(candidate),
                    source,
                });
            }
        }
    }

    with_secret_from_env(LoadedConfig {
        config: Config::default(),
        path: None,
        warnings: litefs_file_warnings(search_paths),
    })
}

/// Takes the cluster secret from [`SECRET_ENV`] when the config names none.
fn with_secret_from_env(mut loaded: LoadedConfig) -> Result<LoadedConfig, ConfigError> {
    if loaded.config.http.secrets.is_empty()
        && let Some(secret) = process_env(SECRET_ENV).filter(|value| !value.is_empty())
    {
        loaded.config.http.secrets = vec![Secret(secret)];
        if let Some(problem) = validate::check_secrets(&loaded.config) {
            return Err(ConfigError::Invalid {
                file: None,
                line: None,
                key: SECRET_ENV.to_string(),
                message: problem.message,
            });
        }
    }
    Ok(loaded)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn parse_file(path: &Path, text: &str, expand_env: bool) -> Result<LoadedConfig, ConfigError> {
    let path = absolute(path);
    let config = parse(text, expand_env).map_err(|error| error.in_file(&path))?;
    tracing::debug!(path = %path.display(), "read configuration");
    Ok(LoadedConfig {
        config,
        path: Some(path),
        warnings: Vec::new(),
    })
}

/// A warning for each `litefs.yml` that sits where an `ltxfs.yml` was looked
/// for: the user most likely forgot to rename it, and would otherwise silently
/// get the defaults.
fn litefs_file_warnings(search_paths: &[PathBuf]) -> Vec<String> {
    search_paths
        .iter()
        .map(|candidate| candidate.with_file_name(LITEFS_CONFIG_FILE_NAME))
        .filter(|litefs_file| litefs_file.is_file())
        .map(|litefs_file| {
            format!(
                "found {} but no {CONFIG_FILE_NAME}; ltxfs reads the same settings from \
                 {CONFIG_FILE_NAME}, so rename it (using the defaults for now)",
                litefs_file.display()
            )
        })
        .collect()
}

/// Treats an empty string as "not set", as LiteFS does for string settings.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|text| !text.is_empty())
}

fn flag_or(value: Option<Flag>, default: bool) -> bool {
    value.map_or(default, |flag| flag.0)
}

fn duration_or(value: Option<GoDuration>, default: Duration) -> Duration {
    value.map_or(default, |duration| duration.0)
}

fn choice_or<T: Choices>(value: Option<Choice<T>>, default: T) -> T {
    value.map_or(default, |choice| choice.0)
}

impl RawConfig {
    /// Fills in the defaults for everything not written.
    fn into_config(self) -> Config {
        let defaults = Config::default();
        let fuse = self.fuse.unwrap_or_default();
        let data = self.data.unwrap_or_default();
        let lease = self.lease.unwrap_or_default();
        let consul = lease.consul.unwrap_or_default();
        let etcd = lease.etcd.unwrap_or_default();
        let http = self.http.unwrap_or_default();
        let replication = self.replication.unwrap_or_default();
        let proxy = self.proxy.unwrap_or_default();
        let log = self.log.unwrap_or_default();
        let backup = self.backup.unwrap_or_default();

        Config {
            exit_on_error: flag_or(self.exit_on_error, defaults.exit_on_error),
            skip_sync: flag_or(self.skip_sync, defaults.skip_sync),
            strict_verify: flag_or(self.strict_verify, defaults.strict_verify),
            exec: self.exec.map(|exec| exec.0).unwrap_or_default(),
            fuse: FuseConfig {
                dir: non_empty(fuse.dir).map(PathBuf::from),
                allow_other: flag_or(fuse.allow_other, defaults.fuse.allow_other),
                debug: flag_or(fuse.debug, defaults.fuse.debug),
                locks: choice_or(fuse.locks, defaults.fuse.locks),
            },
            data: DataConfig {
                dir: non_empty(data.dir).map(PathBuf::from),
                compress: flag_or(data.compress, defaults.data.compress),
                retention: duration_or(data.retention, defaults.data.retention),
                retention_monitor_interval: duration_or(
                    data.retention_monitor_interval,
                    defaults.data.retention_monitor_interval,
                ),
                max_size: data.max_size.map(|size| size.0),
            },
            lease: LeaseConfig {
                lease_type: choice_or(lease.lease_type, defaults.lease.lease_type),
                hostname: non_empty(lease.hostname),
                advertise_url: non_empty(lease.advertise_url),
                candidate: flag_or(lease.candidate, defaults.lease.candidate),
                promote: flag_or(lease.promote, defaults.lease.promote),
                reconnect_delay: duration_or(lease.reconnect_delay, defaults.lease.reconnect_delay),
                demote_delay: duration_or(lease.demote_delay, defaults.lease.demote_delay),
                consul: ConsulConfig {
                    url: non_empty(consul.url),
                    key: non_empty(consul.key),
                    ttl: duration_or(consul.ttl, defaults.lease.consul.ttl),
                    lock_delay: duration_or(consul.lock_delay, defaults.lease.consul.lock_delay),
                },
                etcd: EtcdConfig {
                    endpoints: etcd.endpoints.map(|list| list.0).unwrap_or_default(),
                    key: non_empty(etcd.key),
                    ttl: duration_or(etcd.ttl, defaults.lease.etcd.ttl),
                },
            },
            http: HttpConfig {
                addr: non_empty(http.addr).unwrap_or_default(),
                secrets: match (non_empty(http.secret), http.secrets) {
                    (Some(secret), _) => vec![Secret(secret)],
                    (None, Some(list)) => list.into_iter().map(Secret).collect(),
                    (None, None) => Vec::new(),
                },
                tls: http.tls.map(|tls| TlsFiles {
                    cert: PathBuf::from(tls.cert.unwrap_or_default()),
                    key: PathBuf::from(tls.key.unwrap_or_default()),
                    ca: non_empty(tls.ca).map(PathBuf::from),
                }),
                metrics_secret: flag_or(http.metrics_secret, defaults.http.metrics_secret),
                accept_unsigned: flag_or(http.accept_unsigned, defaults.http.accept_unsigned),
            },
            replication: ReplicationConfig {
                synchronous: flag_or(replication.synchronous, defaults.replication.synchronous),
            },
            proxy: ProxyConfig {
                addr: non_empty(proxy.addr),
                target: non_empty(proxy.target),
                db: proxy.db.map(|list| list.0).unwrap_or_default(),
                debug: flag_or(proxy.debug, defaults.proxy.debug),
                passthrough: proxy.passthrough.map(|list| list.0).unwrap_or_default(),
                always_forward: proxy.always_forward.map(|list| list.0).unwrap_or_default(),
                max_lag: proxy.max_lag.map(|lag| lag.0).filter(|lag| !lag.is_zero()),
                primary_redirect_timeout: duration_or(
                    proxy.primary_redirect_timeout,
                    defaults.proxy.primary_redirect_timeout,
                ),
                mode: proxy.mode.map(|choice| choice.0),
            },
            log: LogConfig {
                format: choice_or(log.format, defaults.log.format),
                debug: flag_or(log.debug, defaults.log.debug),
                timestamp: flag_or(log.timestamp, defaults.log.timestamp),
            },
            backup: BackupConfig {
                destinations: backup
                    .destinations
                    .unwrap_or_default()
                    .into_iter()
                    .map(|destination| BackupDestination {
                        url: destination.url.unwrap_or_default(),
                        endpoint: non_empty(destination.endpoint),
                        region: non_empty(destination.region),
                        access_key_id: non_empty(destination.access_key_id).map(Secret),
                        secret_access_key: non_empty(destination.secret_access_key).map(Secret),
                        service_account: non_empty(destination.service_account).map(PathBuf::from),
                        account_name: non_empty(destination.account_name),
                        account_key: non_empty(destination.account_key).map(Secret),
                    })
                    .collect(),
                sync_interval: duration_or(backup.sync_interval, defaults.backup.sync_interval),
                snapshot_interval: duration_or(
                    backup.snapshot_interval,
                    defaults.backup.snapshot_interval,
                ),
                compaction_windows: backup
                    .compaction_windows
                    .map_or(defaults.backup.compaction_windows, |windows| {
                        windows.into_iter().map(|window| window.0).collect()
                    }),
                retention: duration_or(backup.retention, defaults.backup.retention),
                restore_on_boot: flag_or(backup.restore_on_boot, defaults.backup.restore_on_boot),
                encryption: {
                    let encryption = backup.encryption.unwrap_or_default();
                    BackupEncryption {
                        age_recipients: encryption
                            .age_recipients
                            .map(|list| list.0)
                            .unwrap_or_default(),
                        age_identity_file: non_empty(encryption.age_identity_file)
                            .map(PathBuf::from),
                    }
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn byte_order_marks_and_windows_line_endings_are_accepted() {
        let text = "\u{feff}fuse:\r\n  dir: /litefs\r\nlease:\r\n  type: consul\r\n";
        let error = parse_with_env(text, Some(&no_env)).unwrap_err();
        assert_eq!(error.key(), Some("lease.consul.url"));
        assert_eq!(error.line(), Some(3));
        let config = parse("\u{feff}fuse:\r\n  dir: /litefs\r\n", false).unwrap();
        assert_eq!(config.fuse.dir, Some(PathBuf::from("/litefs")));
    }

    #[test]
    fn a_null_document_is_the_default() {
        assert_eq!(parse("~\n", false).unwrap(), Config::default());
        assert_eq!(parse("# nothing\n", false).unwrap(), Config::default());
        assert_eq!(parse("", false).unwrap(), Config::default());
    }
}
