//! Runs `ltxfs mount`: checks the mount point and data dir, mounts, runs the `exec`
//! commands, and unmounts on a signal or when the command exits.
//!
//! Invariants:
//! - Every check that can fail on bad input runs before anything is created or
//!   changed on disk (the one exception: a stale mount of a crashed ltxfs is cleaned).
//! - Only one ltxfs process uses a data dir at a time: an exclusive `flock` on
//!   `<data dir>/lock`, held for the life of the process.
//! - The FUSE session runs on its own threads; this module's async code waits for
//!   signals and child processes and runs the replication tasks, which reach the
//!   store only through its public API (and `bridge` for commit notifications).
//! - The node's address (`http.addr`) is bound before the mount exists, so a busy
//!   port is reported up front; on the way out the replication tasks stop before
//!   the unmount.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backup::encryption::{Identities, Recipients};
use crate::backup::{BackupStatus, Destination, Uploader};
use crate::bridge::CommitBridge;
use crate::lease::consul::ConsulLease;
use crate::lease::etcd::EtcdLease;
use crate::lease::static_lease::StaticLease;
use crate::lease::{Lease, LeaseHolder};
use crate::node::{self, NodeSettings};
use crate::proxy::{self, ProxyNode, ProxySettings, WriteGate};
use crate::replication::{
    self, ClientCredentials, ClusterKeys, Handoffs, NodeContext, ReplicationError, ServerSettings,
};

use crate::config::{Config, ExecCommand, FuseLocks, LeaseType};
use crate::fs::Fs;
use crate::fuse::{self, MountedSession};
use crate::mountinfo;
use crate::store::locks::LockServer;
use crate::store::log::RetentionPolicy;
use crate::store::{CaptureOptions, Role, Store};

/// How many threads read and answer FUSE requests. More than the core count, so a
/// slow `fsync` on one thread never stalls reads and lock calls on the others.
pub const FUSE_WORKER_THREADS: usize = 8;

/// Threads of the async runtime (signals, exec, replication). Applying change sets
/// and reading logs run on its blocking pool, not on these.
const ASYNC_WORKER_THREADS: usize = 2;

/// How often `exec` checks whether the node is ready to run its commands.
const READINESS_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// How long a mount left at the mount point may take to answer `statfs` at
/// start-up before ltxfs gives up on it.
const STALE_MOUNT_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The file in the data dir that keeps the cluster ID.
const CLUSTER_ID_FILE: &str = "cluster-id";

/// How long the role loop may take to stop at shutdown: a primary's handoff
/// waits up to `HANDOFF_TIMEOUT` for the new primary.
const REPLICATION_STOP_TIMEOUT: std::time::Duration =
    replication::HANDOFF_TIMEOUT.saturating_add(std::time::Duration::from_secs(2));
/// How long the replication server may take to stop after the role loop.
const SERVER_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How often blocking lock requests are checked for processes that died waiting.
const LOCK_REAPER_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The device the kernel's FUSE driver offers.
const FUSE_DEVICE: &str = "/dev/fuse";

/// Why `ltxfs mount` could not run.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// The user must fix the command line, the config, or the machine.
    #[error("{0}")]
    Usage(String),
    /// Something failed while running.
    #[error("{context}: {source}")]
    Runtime {
        /// What ltxfs was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl MountError {
    fn runtime(context: impl Into<String>, source: io::Error) -> MountError {
        MountError::Runtime {
            context: context.into(),
            source,
        }
    }
}

/// What `ltxfs mount` was asked to do.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// The mount point from the command line; overrides `fuse.dir`.
    pub mount_point: Option<PathBuf>,
    /// The loaded configuration.
    pub config: Config,
    /// A command given after `--`; replaces the config's `exec`.
    pub command: Option<ExecCommand>,
    /// Record change sets (off only to measure what capture costs).
    pub capture: bool,
}

/// The checked places a mount uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPlan {
    /// The absolute mount point.
    pub mount_point: PathBuf,
    /// The absolute data dir.
    pub data_dir: PathBuf,
    /// Whether the mount point must be created.
    pub create_mount_point: bool,
}

/// The data dir used when the config names none: beside the mount point, never in it.
pub fn default_data_dir(mount_point: &Path) -> PathBuf {
    let name = mount_point
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".to_string());
    mount_point
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("{name}.ltxfs"))
}

/// Checks the mount point and data dir without changing anything on disk, except
/// that a stale mount left by a crashed ltxfs is cleaned.
pub fn plan(request: &MountRequest) -> Result<MountPlan, MountError> {
    let mount_point = request
        .mount_point
        .clone()
        .or_else(|| request.config.fuse.dir.clone())
        .ok_or_else(|| {
            MountError::Usage(
                "no mount point: give one (ltxfs mount ./mnt) or set fuse.dir in ltxfs.yml"
                    .to_string(),
            )
        })?;
    let mount_point = absolute(&mount_point)?;
    let data_dir = match &request.config.data.dir {
        Some(dir) => absolute(dir)?,
        None => default_data_dir(&mount_point),
    };
    if data_dir.starts_with(&mount_point) {
        return Err(MountError::Usage(format!(
            "data dir {} is inside the mount point {}: set data.dir to a directory outside it",
            data_dir.display(),
            mount_point.display()
        )));
    }
    if mount_point.starts_with(&data_dir) {
        return Err(MountError::Usage(format!(
            "mount point {} is inside the data dir {}: choose separate directories",
            mount_point.display(),
            data_dir.display()
        )));
    }
    check_supported(&request.config)?;
    check_fuse_device()?;
    clean_stale_mount(&mount_point)?;
    let create_mount_point = check_mount_point(&mount_point)?;
    check_data_dir(&data_dir)?;
    Ok(MountPlan {
        mount_point,
        data_dir,
        create_mount_point,
    })
}

/// Refuses settings that cannot work together, before anything changes: the
/// coordinator's client settings, and a static replica without the primary's URL.
fn check_supported(config: &Config) -> Result<(), MountError> {
    if config.lease.lease_type != LeaseType::Static {
        // Builds the client only to check its settings; it contacts nothing.
        coordinator(config)?;
    }
    if config.lease.lease_type == LeaseType::Static
        && !config.lease.candidate
        && config.lease.advertise_url.is_none()
    {
        return Err(MountError::Usage(
            "a replica (lease.candidate: false) with the static lease needs \
             lease.advertise-url: the primary's URL, e.g. http://primary:20202"
                .to_string(),
        ));
    }
    Ok(())
}

fn absolute(path: &Path) -> Result<PathBuf, MountError> {
    std::path::absolute(path)
        .map_err(|error| MountError::Usage(format!("bad path {}: {error}", path.display())))
}

fn check_fuse_device() -> Result<(), MountError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(FUSE_DEVICE)
        .map(drop)
        .map_err(|error| {
            MountError::Usage(format!(
                "cannot open {FUSE_DEVICE} ({error}): load the fuse kernel module, or give the \
                 container the device (docker run --device /dev/fuse --cap-add SYS_ADMIN)"
            ))
        })
}

/// Unmounts what a crashed ltxfs left at `mount_point`; refuses a live mount,
/// and one whose ltxfs does not answer (stopped, or stuck while dying).
fn clean_stale_mount(mount_point: &Path) -> Result<(), MountError> {
    let entry = mountinfo::find(mount_point)
        .map_err(|error| MountError::runtime("read /proc/self/mountinfo", error))?;
    let Some(entry) = entry.filter(mountinfo::MountEntry::is_ltxfs) else {
        return Ok(());
    };
    match statfs_within(mount_point, STALE_MOUNT_ANSWER_TIMEOUT) {
        Some(Err(error)) if error.raw_os_error() == Some(libc::ENOTCONN) => {
            fuse::detach(mount_point).map_err(|error| {
                MountError::runtime(
                    format!("unmount the stale mount at {}", mount_point.display()),
                    error,
                )
            })?;
            tracing::warn!(mount_point = %mount_point.display(), "cleaned a stale mount left by an earlier ltxfs that did not exit cleanly");
            Ok(())
        }
        None => {
            let connection = entry.device.split(':').nth(1).unwrap_or("N");
            Err(MountError::Usage(format!(
                "{} is mounted by an ltxfs that has not answered for {} s (stopped, or stuck \
                 while dying): stop that process, or abort its FUSE connection with \
                 `echo 1 > /sys/fs/fuse/connections/{connection}/abort`",
                mount_point.display(),
                STALE_MOUNT_ANSWER_TIMEOUT.as_secs()
            )))
        }
        Some(_) => Err(MountError::Usage(format!(
            "{} is already mounted by a running ltxfs: stop it first, or choose another mount point",
            mount_point.display()
        ))),
    }
}

/// [`statfs`] of `path`, or `None` when it has not returned within `timeout`.
/// The thread asking is then left behind: its request, which no ltxfs has
/// read, is dropped when this process exits.
fn statfs_within(path: &Path, timeout: std::time::Duration) -> Option<io::Result<()>> {
    let (answer, answered) = std::sync::mpsc::sync_channel(1);
    let probed = path.to_path_buf();
    let probe = std::thread::Builder::new()
        .name("stale-mount-probe".to_string())
        .spawn(move || {
            let _ = answer.send(statfs(&probed));
        });
    match probe {
        Ok(_) => answered.recv_timeout(timeout).ok(),
        // No thread to spare: ask on this one, without a time limit.
        Err(_) => Some(statfs(path)),
    }
}

/// `statfs(2)` of `path`. On a FUSE mount the kernel always asks the daemon
/// (a `stat` may be answered from cached attributes), so a mount whose ltxfs
/// died answers `ENOTCONN` at once.
fn statfs(path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stats` is a live local.
    if unsafe { libc::statfs(path.as_ptr(), &mut stats) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Returns whether the mount point must be created.
fn check_mount_point(mount_point: &Path) -> Result<bool, MountError> {
    match std::fs::metadata(mount_point) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(error) => Err(MountError::Usage(format!(
            "cannot use mount point {}: {error}",
            mount_point.display()
        ))),
        Ok(metadata) if !metadata.is_dir() => Err(MountError::Usage(format!(
            "mount point {} is not a directory: remove it or choose another path",
            mount_point.display()
        ))),
        Ok(_) => {
            let mut entries = std::fs::read_dir(mount_point).map_err(|error| {
                MountError::Usage(format!(
                    "cannot list mount point {}: {error}",
                    mount_point.display()
                ))
            })?;
            if entries.next().is_some() {
                return Err(MountError::Usage(format!(
                    "mount point {} is not empty: ltxfs mounts only on an empty directory, so move \
                     its contents away or choose another path",
                    mount_point.display()
                )));
            }
            Ok(false)
        }
    }
}

/// Checks that the data dir is (or can become) a writable directory.
fn check_data_dir(data_dir: &Path) -> Result<(), MountError> {
    let unusable = |why: String| {
        MountError::Usage(format!(
            "data dir {} is not usable: {why}; set data.dir to a writable directory",
            data_dir.display()
        ))
    };
    let mut existing = data_dir;
    loop {
        match std::fs::metadata(existing) {
            Ok(metadata) if metadata.is_dir() => break,
            Ok(_) => {
                return Err(unusable(format!(
                    "{} is not a directory",
                    existing.display()
                )));
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => match existing.parent() {
                Some(parent) => existing = parent,
                None => return Err(unusable("no existing parent directory".to_string())),
            },
            Err(error) => return Err(unusable(error.to_string())),
        }
    }
    let path = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
        .map_err(|_| unusable("path contains NUL".to_string()))?;
    // SAFETY: `path` is a valid NUL-terminated string.
    if unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(unusable(format!(
            "{} is not writable ({})",
            existing.display(),
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Takes the data dir's exclusive lock, creating the dir; fails when another ltxfs
/// holds it.
fn lock_data_dir(data_dir: &Path) -> Result<File, MountError> {
    std::fs::create_dir_all(data_dir).map_err(|error| {
        MountError::Usage(format!(
            "cannot create data dir {}: {error}; set data.dir to a writable directory",
            data_dir.display()
        ))
    })?;
    let lock_path = data_dir.join("lock");
    let mut lock_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|error| {
            MountError::Usage(format!(
                "cannot open {}: {error}; set data.dir to a writable directory",
                lock_path.display()
            ))
        })?;
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
        return Err(MountError::Usage(format!(
            "another ltxfs process (pid {}) is using data dir {}: stop it first, or give each \
             process its own data.dir",
            holder.trim(),
            data_dir.display()
        )));
    }
    let pid = std::process::id().to_string();
    lock_file
        .set_len(0)
        .and_then(|()| lock_file.write_all(pid.as_bytes()))
        .map_err(|error| MountError::runtime(format!("write {}", lock_path.display()), error))?;
    Ok(lock_file)
}

/// Mounts, runs the exec commands (if any), and returns the exit status ltxfs should
/// end with.
pub fn run(request: MountRequest) -> Result<i32, MountError> {
    let plan = plan(&request)?;
    check_backup_destinations(&request.config)?;
    let _data_dir_lock = lock_data_dir(&plan.data_dir)?;
    if plan.create_mount_point {
        std::fs::create_dir_all(&plan.mount_point).map_err(|error| {
            MountError::Usage(format!(
                "cannot create mount point {}: {error}",
                plan.mount_point.display()
            ))
        })?;
    }
    let capture = CaptureOptions {
        enabled: request.capture,
        compress: request.config.data.compress,
        strict_verify: request.config.strict_verify,
        locks: match request.config.fuse.locks {
            FuseLocks::Kernel => LockServer::Kernel,
            FuseLocks::Ltxfs => LockServer::Ltxfs,
        },
    };
    let security = node_api_security(&request.config)?;
    let listener = bind_address("http.addr", &request.config.http.addr)?;
    let address = listener
        .local_addr()
        .map_err(|error| MountError::runtime("read the node's address", error))?;
    record_api_url(&plan.data_dir, &request.config, address);
    let proxy_listener = match &request.config.proxy.addr {
        Some(addr) if request.config.proxy.is_enabled() => Some(bind_address("proxy.addr", addr)?),
        _ => None,
    };
    // The static lease's candidate is the primary from the start (epoch 1, as the
    // lease says), so writes work as soon as the mount does; every other node
    // starts as a replica until it holds the lease.
    let static_primary =
        request.config.lease.lease_type == LeaseType::Static && request.config.lease.candidate;
    let role = if static_primary {
        Role::Primary
    } else {
        Role::Replica
    };
    let restored_on_boot = request.config.backup.restore_on_boot
        && request.config.lease.candidate
        && restore_on_boot(&request.config, &plan.data_dir)?;
    // A node that restored its data from a backup leaves a free lease, for
    // one lease TTL, to candidates that kept their own: they may hold
    // transactions the backup had not received yet.
    let campaign_from = restored_on_boot
        .then(|| lease_ttl(&request.config))
        .flatten()
        .map(|ttl| Instant::now() + ttl);
    let store = Store::open(&plan.data_dir, capture, role)
        .map_err(|error| MountError::runtime("open the data dir", io::Error::other(error)))?;
    if static_primary {
        store.set_epoch(StaticLease::EPOCH.0);
    }
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let store = Arc::new(store);
    let fs = Arc::new(Fs::new(store.clone(), uid, gid));
    // Signals are caught from before the mount exists, so a SIGTERM that arrives
    // while mounting still unmounts cleanly instead of killing ltxfs.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(ASYNC_WORKER_THREADS)
        .enable_all()
        .build()
        .map_err(|error| MountError::runtime("start the async runtime", error))?;
    let signals = {
        let _context = runtime.enter();
        Signals::listen()?
    };
    let backup_destinations = open_backup_destinations(&request.config)?;
    let unmounted = CancellationToken::new();
    let session = MountedSession::start(
        fs,
        &plan.mount_point,
        request.config.fuse.allow_other,
        FUSE_WORKER_THREADS,
        unmounted.clone(),
    )
    .map_err(|error| MountError::runtime(format!("mount {}", plan.mount_point.display()), error))?;
    tracing::info!(
        mount_point = %plan.mount_point.display(),
        data_dir = %plan.data_dir.display(),
        "ltxfs mounted"
    );

    let commands = match request.command {
        Some(command) => vec![command],
        None => request.config.exec.clone(),
    };
    let commands: Vec<ExecCommand> = commands
        .into_iter()
        .filter(|command| !command.if_candidate || request.config.lease.candidate)
        .collect();
    let policy = RetentionPolicy {
        max_age: request.config.data.retention,
        max_bytes: request.config.data.max_size,
        keep_after: None,
    };
    let retention_store = store.clone();
    let retention = PeriodicTask::start(
        "retention",
        request.config.data.retention_monitor_interval,
        move || {
            let merged = retention_store.enforce_retention(policy);
            if merged > 0 {
                tracing::info!(merged, "merged change sets older than the retention period");
            }
        },
    )
    .map_err(|error| MountError::runtime("start the retention monitor", error))?;
    // Only ltxfs's lock table has waits for the reaper to cancel.
    let lock_reaper = match capture.locks {
        LockServer::Kernel => None,
        LockServer::Ltxfs => {
            let reaper_store = store.clone();
            Some(
                PeriodicTask::start("lock-reaper", LOCK_REAPER_INTERVAL, move || {
                    let cancelled = reaper_store.cancel_abandoned_lock_waits();
                    if cancelled > 0 {
                        tracing::info!(
                            cancelled,
                            "cancelled lock waits of processes that died while waiting"
                        );
                    }
                })
                .map_err(|error| MountError::runtime("start the lock reaper", error))?,
            )
        }
    };
    let backup_status = Arc::new(BackupStatus::for_destinations(&backup_destinations));
    if !request.config.backup.destinations.is_empty() {
        store.set_retention_pins(backup_status.clone());
    }
    let replication = ReplicationTasks::start(
        &runtime,
        &request.config,
        &store,
        &plan.data_dir,
        (listener, proxy_listener),
        security,
        (backup_status.clone(), campaign_from),
    )?;
    let backup_shutdown = CancellationToken::new();
    let backup_tasks = {
        let _context = runtime.enter();
        Uploader {
            store: store.clone(),
            destinations: backup_destinations,
            config: request.config.backup.clone(),
            spool_dir: plan.data_dir.clone(),
            status: backup_status,
            recipients: backup_recipients(&request.config)?,
        }
        .spawn(&backup_shutdown)
    };
    let failed = replication.failed.clone();
    let exit_code = runtime.block_on(async {
        tokio::select! {
            exit_code = supervise(commands, signals, &plan.mount_point, &store) => exit_code,
            () = failed.cancelled() => Err(MountError::Usage(
                "this node cannot join the cluster (see the error above)".to_string(),
            )),
            // A node with nothing mounted must not stay primary or serve.
            () = unmounted.cancelled() => Err(MountError::runtime(
                format!("serve {}", plan.mount_point.display()),
                io::Error::other("another process unmounted it; stopping"),
            )),
        }
    });
    backup_shutdown.cancel();
    runtime.block_on(async {
        if tokio::time::timeout(SERVER_STOP_TIMEOUT, join_all(backup_tasks))
            .await
            .is_err()
        {
            tracing::warn!("the backup uploaders did not stop in time");
        }
    });
    replication.stop(&runtime);
    retention.stop();
    if let Some(lock_reaper) = lock_reaper {
        lock_reaper.stop();
    }
    session.unmount();
    if let Err(error) = store.shutdown() {
        tracing::error!(%error, "could not save state for a fast restart; the next start rereads the databases");
    }
    exit_code
}

/// Connects to every `backup.destinations` entry and checks that it answers
/// with the credentials given, before anything is created or mounted: a wrong
/// URL, a missing bucket or bad credentials is a usage error naming the
/// destination. Uses a runtime of its own, dropped with its connections.
fn check_backup_destinations(config: &Config) -> Result<(), MountError> {
    if config.backup.destinations.is_empty() {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            MountError::runtime("start a runtime to check backup destinations", error)
        })?;
    backup_recipients(config)?;
    for destination in open_backup_destinations(config)? {
        runtime
            .block_on(destination.check())
            .map_err(|error| MountError::Usage(error.to_string()))?;
    }
    Ok(())
}

/// The time-to-live of the configured coordinator's lease; `None` for the
/// static lease, which no other node campaigns for.
fn lease_ttl(config: &Config) -> Option<Duration> {
    match config.lease.lease_type {
        LeaseType::Static => None,
        LeaseType::Consul => Some(config.lease.consul.ttl),
        LeaseType::Etcd => Some(config.lease.etcd.ttl),
    }
}

/// `backup.restore-on-boot`: when the data dir holds no database, restores
/// every database of the first destination into it, before the store opens
/// and so before any write or `exec` command; says whether it restored
/// any. A data dir with data is never restored over.
fn restore_on_boot(config: &Config, data_dir: &Path) -> Result<bool, MountError> {
    let empty = crate::store::seed::data_dir_is_empty(data_dir)
        .map_err(|error| MountError::runtime("read the data dir", io::Error::other(error)))?;
    if !empty {
        tracing::info!("the data dir has databases; not restoring from the backup");
        return Ok(false);
    }
    let Some(destination) = open_backup_destinations(config)?.into_iter().next() else {
        return Ok(false);
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|error| MountError::runtime("start a runtime to restore", error))?;
    if let Some(primary) = runtime.block_on(live_primary(config))? {
        tracing::info!(
            primary = primary.hostname,
            url = primary.advertise_url,
            "a primary holds the lease; this node gets its data from it instead of restoring the backup"
        );
        return Ok(false);
    }
    let identities = match &config.backup.encryption.age_identity_file {
        Some(path) => Some(
            Identities::from_file(path).map_err(|error| MountError::Usage(error.to_string()))?,
        ),
        None => None,
    };
    let restored = runtime
        .block_on(crate::backup::restore::restore_into_data_dir(
            &destination,
            data_dir,
            identities.as_ref(),
        ))
        .map_err(|error| MountError::runtime("restore from the backup", io::Error::other(error)))?;
    if restored.is_empty() {
        tracing::info!(destination = %destination, "the backup holds no database; starting empty");
    }
    let any = !restored.is_empty();
    for (name, database) in restored {
        tracing::info!(
            database = name,
            txid = %database.txid,
            bytes = database.bytes,
            destination = %destination,
            "restored from the backup"
        );
    }
    Ok(any)
}

/// The node that holds the coordinator's lease, other than this one, if any:
/// a node with data that a node starting empty follows rather than restoring
/// over. When the coordinator cannot be asked, says so and answers `None`:
/// a restored node leaves the lease to the others for one TTL anyway.
async fn live_primary(config: &Config) -> Result<Option<LeaseHolder>, MountError> {
    let Some(lease) = coordinator(config)? else {
        return Ok(None);
    };
    let asked = tokio::time::timeout(lease.ttl(), lease.watch(None, Duration::ZERO)).await;
    let state = match asked {
        Ok(Ok(state)) => state,
        Ok(Err(error)) => {
            let error: &dyn std::error::Error = &error;
            tracing::warn!(
                error,
                "cannot ask the lease whether a primary holds data; restoring the backup"
            );
            return Ok(None);
        }
        Err(_) => {
            tracing::warn!(timeout = ?lease.ttl(), "the lease did not say in time whether a primary holds data; restoring the backup");
            return Ok(None);
        }
    };
    let me = node_hostname(config);
    Ok(state
        .holder
        .map(|(holder, _)| holder)
        .filter(|holder| holder.hostname != me))
}

/// The age recipients backups are encrypted to, if any.
fn backup_recipients(config: &Config) -> Result<Option<Recipients>, MountError> {
    let keys = &config.backup.encryption.age_recipients;
    if keys.is_empty() {
        return Ok(None);
    }
    Recipients::parse(keys)
        .map(Some)
        .map_err(|error| MountError::Usage(error.to_string()))
}

/// A client for every `backup.destinations` entry (nothing is sent yet).
fn open_backup_destinations(config: &Config) -> Result<Vec<Destination>, MountError> {
    config
        .backup
        .destinations
        .iter()
        .map(|entry| Destination::open(entry).map_err(|error| MountError::Usage(error.to_string())))
        .collect()
}

/// Binds the listen address `addr` of config key `key` (`:PORT` means every
/// interface), non-blocking for tokio.
fn bind_address(key: &str, addr: &str) -> Result<std::net::TcpListener, MountError> {
    let address = match addr.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => addr.to_string(),
    };
    let listener = std::net::TcpListener::bind(&address).map_err(|error| {
        MountError::Usage(format!(
            "cannot listen on {key} {addr:?}: {error}; choose another address in ltxfs.yml"
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|error| MountError::runtime("configure the node's listener", error))?;
    Ok(listener)
}

/// The node API's TLS and secret settings, read before anything is mounted so
/// that unusable files are a configuration error.
fn node_api_security(config: &Config) -> Result<(ServerSettings, ClientCredentials), MountError> {
    let keys = ClusterKeys::new(config.http.secrets.clone())
        .accepting_unsigned(config.http.accept_unsigned);
    if config.http.accept_unsigned {
        tracing::warn!(
            "http.accept-unsigned is on: calls without the cluster secret are still accepted; \
             turn it off once every node has the secret (docs/security.md)"
        );
    }
    let usage = |error: ReplicationError| MountError::Usage(error.to_string());
    let tls = config
        .http
        .tls
        .as_ref()
        .map(replication::server_tls)
        .transpose()
        .map_err(usage)?;
    let credentials =
        ClientCredentials::new(keys.clone(), config.http.tls.as_ref()).map_err(usage)?;
    let settings = ServerSettings {
        keys,
        tls,
        metrics_secret: config.http.metrics_secret,
    };
    Ok((settings, credentials))
}

/// Where others reach this node's API when no `lease.advertise-url` says so: at
/// the address it is bound to, or by its hostname when it listens on every
/// interface.
fn own_url(config: &Config, address: std::net::SocketAddr) -> String {
    let scheme = if config.http.tls.is_some() {
        "https"
    } else {
        "http"
    };
    if address.ip().is_unspecified() {
        format!("{scheme}://{}:{}", node_hostname(config), address.port())
    } else {
        format!("{scheme}://{address}")
    }
}

/// Records in the data dir the URL local tools (`ltxfs status`, `promote`) reach
/// this node's API at, before the mount appears: the loopback address when the
/// API listens on every interface or on loopback, or [`own_url`] with TLS (whose
/// certificate names the host, not the loopback address).
fn record_api_url(data_dir: &Path, config: &Config, address: std::net::SocketAddr) {
    let url = if config.http.tls.is_some() {
        own_url(config, address)
    } else if address.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", address.port())
    } else {
        format!("http://{address}")
    };
    let path = data_dir.join(crate::config::API_URL_FILE);
    let staging = data_dir.join(format!("{}.new", crate::config::API_URL_FILE));
    let written = std::fs::write(&staging, format!("{url}\n"))
        .and_then(|()| std::fs::rename(&staging, &path));
    if let Err(error) = written {
        tracing::warn!(path = %path.display(), %error, "could not record the node API's URL; local tools need --url");
    }
}

/// Waits for every task.
async fn join_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// The host of an `http://host:port[/...]` URL (as is, when it is not one).
fn url_host(url: &str) -> &str {
    let authority = url.strip_prefix("http://").unwrap_or(url);
    let authority = authority.split('/').next().unwrap_or(authority);
    match authority.rsplit_once(':') {
        // An IPv6 address without a port ends with `]`.
        Some((host, port)) if !port.contains(']') => host,
        _ => authority,
    }
}

/// The proxy's settings from `proxy.*` (the mode depends on `FLY_APP_NAME`).
fn proxy_settings(config: &Config) -> ProxySettings {
    let proxy = &config.proxy;
    ProxySettings {
        target: proxy.target.clone().unwrap_or_default(),
        databases: proxy.db.clone(),
        passthrough: proxy.passthrough.clone(),
        always_forward: proxy.always_forward.clone(),
        max_lag: proxy.max_lag,
        redirect_timeout: proxy.primary_redirect_timeout,
        mode: proxy.mode_in(std::env::var("FLY_APP_NAME").ok().as_deref()),
        debug: proxy.debug,
    }
}

/// The Consul or etcd client the config names (`None` for the static lease).
fn coordinator(config: &Config) -> Result<Option<Arc<dyn Lease>>, MountError> {
    let setup_error = |error: &dyn std::fmt::Display| MountError::Usage(error.to_string());
    Ok(match config.lease.lease_type {
        LeaseType::Static => None,
        LeaseType::Consul => Some(Arc::new(
            ConsulLease::new(&config.lease.consul).map_err(|e| setup_error(&e))?,
        )),
        LeaseType::Etcd => Some(Arc::new(
            EtcdLease::new(&config.lease.etcd).map_err(|e| setup_error(&e))?,
        )),
    })
}

/// The lease the config names: a coordinator, or the static lease.
fn make_lease(config: &Config, me: &LeaseHolder) -> Result<Arc<dyn Lease>, MountError> {
    if let Some(lease) = coordinator(config)? {
        return Ok(lease);
    }
    let primary = if config.lease.candidate {
        me.clone()
    } else {
        LeaseHolder {
            // Replicas learn the static primary's name from its stream.
            hostname: String::new(),
            advertise_url: config.lease.advertise_url.clone().unwrap_or_default(),
        }
    };
    Ok(Arc::new(StaticLease::new(config.lease.candidate, primary)))
}

/// This node's name: `lease.hostname`, else the machine's hostname.
fn node_hostname(config: &Config) -> String {
    if let Some(hostname) = &config.lease.hostname {
        return hostname.clone();
    }
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length.
    let rc = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    let len = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    if rc != 0 || len == 0 {
        return "localhost".to_string();
    }
    String::from_utf8_lossy(&buffer[..len]).into_owned()
}

/// The replication server every node runs (status on all, change sets on the
/// primary) and, on a replica, the client that follows the primary.
struct ReplicationTasks {
    /// Stops the role loop.
    node_shutdown: CancellationToken,
    /// Stops the replication server, once the role loop has stopped.
    server_shutdown: CancellationToken,
    /// Cancelled when the node must stop (its data belongs to another cluster).
    failed: CancellationToken,
    role_loop: tokio::task::JoinHandle<()>,
    /// The replication server and, when configured, the proxy.
    servers: Vec<tokio::task::JoinHandle<()>>,
    /// Where the replication client runs (one thread; see `start`).
    replica_runtime: tokio::runtime::Runtime,
}

impl ReplicationTasks {
    fn start(
        runtime: &tokio::runtime::Runtime,
        config: &Config,
        store: &Arc<Store>,
        data_dir: &Path,
        (listener, proxy_listener): (std::net::TcpListener, Option<std::net::TcpListener>),
        (server_settings, credentials): (ServerSettings, ClientCredentials),
        (backups, campaign_from): (Arc<BackupStatus>, Option<Instant>),
    ) -> Result<ReplicationTasks, MountError> {
        let _context = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|error| MountError::runtime("listen on http.addr", error))?;
        let proxy_listener = proxy_listener
            .map(tokio::net::TcpListener::from_std)
            .transpose()
            .map_err(|error| MountError::runtime("listen on proxy.addr", error))?;
        let hostname = node_hostname(config);
        let address = listener
            .local_addr()
            .map_err(|error| MountError::runtime("read the node's address", error))?;
        let own_url = own_url(config, address);
        if config.names_other_nodes() && !server_settings.keys.is_enabled() {
            tracing::warn!(
                %address,
                "the node API is open: anyone who can reach this address can read every \
                 database and take the primary role; set the same http.secret (or \
                 LTXFS_SECRET) on every node to close it (docs/security.md)"
            );
        }
        // With the static lease, advertise-url names the primary on every node;
        // with a coordinator it is how others reach this node.
        let me = LeaseHolder {
            hostname: hostname.clone(),
            advertise_url: match &config.lease.advertise_url {
                Some(url)
                    if config.lease.candidate || config.lease.lease_type != LeaseType::Static =>
                {
                    url.clone()
                }
                _ => own_url,
            },
        };
        let commits = Arc::new(CommitBridge::new());
        store.set_commit_listener(commits.clone());
        let (handoffs, control) = Handoffs::new();
        let handoffs = Arc::new(handoffs);
        let writes = Arc::new(WriteGate::new());
        // Replicas' proxies forward writes to this node's proxy at the host
        // others reach this node by.
        let proxy_url = match &proxy_listener {
            Some(proxy) => {
                let port = proxy
                    .local_addr()
                    .map_err(|error| MountError::runtime("read the proxy's address", error))?
                    .port();
                Some(format!("http://{}:{port}", url_host(&me.advertise_url)))
            }
            None => None,
        };
        let node = Arc::new(NodeContext {
            store: store.clone(),
            hostname: hostname.clone(),
            commits: commits.clone(),
            spool_dir: data_dir.to_path_buf(),
            handoffs: handoffs.clone(),
            proxy_url,
            synchronous: config.replication.synchronous,
            backups,
        });
        if config.replication.synchronous {
            store.set_commit_hold(handoffs.clone());
        }
        let server_shutdown = CancellationToken::new();
        let mut servers = vec![runtime.spawn({
            let shutdown = server_shutdown.clone();
            async move {
                if let Err(error) =
                    replication::serve(listener, node, server_settings, shutdown).await
                {
                    tracing::error!(%error, "the replication server stopped");
                }
            }
        })];
        if let Some(proxy_listener) = proxy_listener {
            let settings = proxy_settings(config);
            let proxy_node = ProxyNode {
                store: store.clone(),
                commits,
                writes: writes.clone(),
            };
            let shutdown = server_shutdown.clone();
            servers.push(runtime.spawn(async move {
                if let Err(error) =
                    proxy::serve(proxy_listener, settings, proxy_node, shutdown).await
                {
                    let error: &dyn std::error::Error = &error;
                    tracing::error!(error, "the proxy stopped");
                }
            }));
        }
        // The replication client has a runtime of one thread to itself: the
        // stream's connection and the follow loop, which applies small change
        // sets in place, share that thread, so a change set costs one wake-up
        // instead of several hand-offs between threads.
        let replica_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ltxfs-replica")
            .enable_all()
            .build()
            .map_err(|error| {
                MountError::runtime("start the replication client's runtime", error)
            })?;
        let settings = NodeSettings {
            replica_runtime: replica_runtime.handle().clone(),
            store: store.clone(),
            lease: make_lease(config, &me)?,
            me,
            candidate: config.lease.candidate,
            reconnect_delay: config.lease.reconnect_delay,
            cluster_id_path: data_dir.join(CLUSTER_ID_FILE),
            handoffs,
            control,
            writes,
            credentials,
            campaign_from,
        };
        let failed = CancellationToken::new();
        let node_shutdown = CancellationToken::new();
        let role_loop = runtime.spawn({
            let (shutdown, failed) = (node_shutdown.clone(), failed.clone());
            async move {
                if let Err(error) = node::run(settings, shutdown).await {
                    tracing::error!(%error, "stopping");
                    failed.cancel();
                }
            }
        });
        Ok(ReplicationTasks {
            node_shutdown,
            server_shutdown,
            failed,
            role_loop,
            servers,
            replica_runtime,
        })
    }

    /// Stops the role loop (a primary hands its role over first, which needs the
    /// server), then the server, waiting (bounded) for each.
    fn stop(self, runtime: &tokio::runtime::Runtime) {
        runtime.block_on(async {
            self.node_shutdown.cancel();
            if tokio::time::timeout(REPLICATION_STOP_TIMEOUT, self.role_loop)
                .await
                .is_err()
            {
                tracing::warn!("the role loop did not stop in time");
            }
            self.server_shutdown.cancel();
            let servers = join_all(self.servers);
            if tokio::time::timeout(SERVER_STOP_TIMEOUT, servers)
                .await
                .is_err()
            {
                tracing::warn!("the replication server or the proxy did not stop in time");
            }
        });
        self.replica_runtime.shutdown_timeout(SERVER_STOP_TIMEOUT);
    }
}

/// How long stopping a [`PeriodicTask`] waits for a run under way. A
/// retention run can merge a large log for many seconds; shutdown goes on
/// without it, and the run ends with the process, as at a crash: its
/// half-written merge is a scratch file that the next start removes.
const PERIODIC_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A background thread that runs a task at an interval until it is stopped.
struct PeriodicTask {
    name: String,
    stop: std::sync::mpsc::Sender<()>,
    /// Disconnected once the thread has ended.
    ended: std::sync::mpsc::Receiver<()>,
    thread: std::thread::JoinHandle<()>,
}

impl PeriodicTask {
    fn start(
        name: &str,
        interval: std::time::Duration,
        mut task: impl FnMut() + Send + 'static,
    ) -> io::Result<PeriodicTask> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (ending, ended) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _ending = ending;
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(interval)
                {
                    task();
                }
            })?;
        Ok(PeriodicTask {
            name: name.to_string(),
            stop,
            ended,
            thread,
        })
    }

    /// Stops the task: waits up to [`PERIODIC_STOP_TIMEOUT`] for a run under
    /// way, then goes on without it.
    fn stop(self) {
        let _ = self.stop.send(());
        match self.ended.recv_timeout(PERIODIC_STOP_TIMEOUT) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                task = %self.name,
                "a background task is still running; shutting down without waiting for it"
            ),
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if self.thread.join().is_err() {
                    tracing::error!(task = %self.name, "a background task panicked");
                }
            }
        }
    }
}

/// The signals that stop ltxfs (and are forwarded to an exec command).
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts catching SIGTERM and SIGINT; must run inside the async runtime.
    fn listen() -> Result<Signals, MountError> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate())
                .map_err(|error| MountError::runtime("listen for SIGTERM", error))?,
            interrupt: signal(SignalKind::interrupt())
                .map_err(|error| MountError::runtime("listen for SIGINT", error))?,
        })
    }
}

/// Waits for a signal, or runs the commands and forwards signals to them. Returns
/// the exit status for ltxfs.
async fn supervise(
    commands: Vec<ExecCommand>,
    signals: Signals,
    mount_point: &Path,
    store: &Store,
) -> Result<i32, MountError> {
    let Signals {
        mut terminate,
        mut interrupt,
    } = signals;
    if !commands.is_empty() {
        // Commands (migrations above all) start once the node is the primary or
        // follows one, so they neither fail on a replica that knows no primary
        // nor read stale data.
        tokio::select! {
            () = ready(store) => {}
            _ = terminate.recv() => return Ok(0),
            _ = interrupt.recv() => return Ok(0),
        }
    }
    if commands.is_empty() {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received, unmounting"),
            _ = interrupt.recv() => tracing::info!("SIGINT received, unmounting"),
        }
        return Ok(0);
    }
    let last = commands.len() - 1;
    for (index, command) in commands.iter().enumerate() {
        let mut child = tokio::process::Command::new(&command.argv[0])
            .args(&command.argv[1..])
            .current_dir(std::env::current_dir().unwrap_or_else(|_| mount_point.to_path_buf()))
            .spawn()
            .map_err(|error| {
                MountError::Usage(format!(
                    "cannot run exec command {:?}: {error}",
                    command.argv
                ))
            })?;
        let pid = child.id();
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.map_err(|error| MountError::runtime("wait for the exec command", error))?,
                _ = terminate.recv() => forward_signal(pid, libc::SIGTERM),
                _ = interrupt.recv() => forward_signal(pid, libc::SIGINT),
            }
        };
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        if index == last || code != 0 {
            if index != last {
                tracing::error!(command = ?command.argv, code, "exec command failed; not running the rest");
            }
            return Ok(code);
        }
    }
    Ok(0)
}

/// Returns once this node is the primary or a replica connected to a primary.
async fn ready(store: &Store) {
    let mut logged = false;
    loop {
        let cluster = store.cluster();
        if cluster.role() == Role::Primary || cluster.primary().is_some() {
            return;
        }
        if !logged {
            tracing::info!("waiting to become the primary or to reach it before running exec");
            logged = true;
        }
        tokio::time::sleep(READINESS_POLL).await;
    }
}

fn forward_signal(pid: Option<u32>, signal: i32) {
    if let Some(pid) = pid {
        tracing::info!(pid, signal, "forwarding signal to the exec command");
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, signal) };
    }
}

#[cfg(test)]
mod tests {
    use super::{PERIODIC_STOP_TIMEOUT, PeriodicTask};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    /// A retention merge of a large log once held a SIGTERM'd mount past its
    /// stop timeout: stopping a task waits a bounded time for a run under way.
    #[test]
    fn stopping_a_task_does_not_wait_out_a_long_run() {
        let (entered, run_entered) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let task = PeriodicTask::start("slow", Duration::from_millis(1), move || {
            let _ = entered.send(());
            let _ = released.recv_timeout(Duration::from_secs(60));
        })
        .unwrap();
        run_entered.recv_timeout(Duration::from_secs(10)).unwrap();
        let stopping = Instant::now();
        task.stop();
        let took = stopping.elapsed();
        drop(release);
        assert!(took >= PERIODIC_STOP_TIMEOUT, "stopped after {took:?}");
        assert!(
            took < PERIODIC_STOP_TIMEOUT + Duration::from_secs(5),
            "stopped after {took:?}"
        );
    }

    #[test]
    fn stopping_an_idle_task_ends_its_thread() {
        let (ran, runs) = mpsc::channel();
        let task = PeriodicTask::start("quick", Duration::from_millis(1), move || {
            let _ = ran.send(());
        })
        .unwrap();
        runs.recv_timeout(Duration::from_secs(10)).unwrap();
        let stopping = Instant::now();
        task.stop();
        assert!(stopping.elapsed() < PERIODIC_STOP_TIMEOUT);
        // The thread ended: its sender is gone once the queued runs are read.
        loop {
            match runs.recv_timeout(Duration::from_secs(10)) {
                Ok(()) => continue,
                Err(error) => {
                    assert_eq!(error, mpsc::RecvTimeoutError::Disconnected);
                    break;
                }
            }
        }
    }
}
