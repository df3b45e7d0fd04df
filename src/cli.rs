//! The command line: parses arguments and runs a subcommand, returning the process
//! exit status. Usage and configuration errors exit with status 2, other failures
//! with 1; `ltxfs mount` with a command exits with that command's status.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{self, BackupDestination, ExecCommand, LogConfig, LogFormat};
use crate::error_chain::error_chain;
use crate::ltx;
use crate::mount::{self, MountError, MountRequest};
use crate::mountinfo;
use crate::replication::{self, ClientCredentials, ClusterKeys, ReplicationError};
use crate::tools;

mod backup_commands;

/// Exit status for usage and configuration errors.
pub const EXIT_USAGE: i32 = 2;
/// Exit status for failures while running.
pub const EXIT_FAILURE: i32 = 1;

/// ltxfs: replicated SQLite over FUSE.
#[derive(Debug, Parser)]
#[command(name = "ltxfs", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount the filesystem in the foreground; databases opened under it are captured.
    Mount {
        /// Where to mount (overrides fuse.dir from the config).
        mount_point: Option<PathBuf>,
        /// The config file (default: ./ltxfs.yml, then /etc/ltxfs.yml, else defaults).
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Do not expand $VAR and ${VAR} in the config file.
        #[arg(long)]
        no_expand_env: bool,
        /// Do not record change sets; only for measuring what capture costs.
        #[arg(long, hide = true)]
        no_capture: bool,
        /// A command to run once mounted; ltxfs exits with its status.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Write a consistent copy of a database while writes continue.
    Export {
        /// The database's name in the mount.
        #[arg(long)]
        name: String,
        /// Where to write the copy.
        path: PathBuf,
        #[command(flatten)]
        mount: MountSelection,
    },
    /// Replace a database on the primary with a SQLite file, as one transaction.
    Import {
        /// The database's name in the mount.
        #[arg(long)]
        name: String,
        /// The SQLite file to import.
        path: PathBuf,
        #[command(flatten)]
        mount: MountSelection,
    },
    /// Show a node's role, its primary, and every database's TXID, checksum and lag.
    Status {
        #[command(flatten)]
        node: NodeSelection,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make this candidate replica the primary: the primary hands its role over
    /// (no write it accepted is lost) and becomes a replica.
    Promote {
        #[command(flatten)]
        node: NodeSelection,
    },
    /// Rebuild a database from its backup (no running node needed).
    Restore {
        /// The database's name in the mount.
        #[arg(long)]
        name: String,
        /// Where to write the restored SQLite file.
        output: PathBuf,
        #[command(flatten)]
        source: BackupSource,
        /// Restore the state right after this TXID (decimal, or hex with 0x).
        #[arg(long, conflicts_with = "timestamp")]
        txid: Option<String>,
        /// Restore the state of this moment (RFC 3339, e.g. 2026-12-06T10:00:00Z).
        #[arg(long)]
        timestamp: Option<String>,
        /// Do nothing when OUTPUT already exists.
        #[arg(long)]
        if_not_exists: bool,
        /// An age identity file to open encrypted objects with (default:
        /// backup.encryption.age-identity-file of --config).
        #[arg(long)]
        age_identity: Option<PathBuf>,
    },
    /// Show or check what a backup destination holds.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Inspect LTX change-set files.
    Ltx {
        #[command(subcommand)]
        command: LtxCommand,
    },
    /// Compare SQLite on the mount against a plain directory on the same disk.
    #[command(disable_help_flag = true)]
    Bench {
        /// The benchmark's arguments (`ltxfs bench --help` lists them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// Where `restore` and `backup` read from.
#[derive(Debug, clap::Args)]
struct BackupSource {
    /// Take the first of backup.destinations (and its credentials) from this config file.
    #[arg(long, short = 'c', conflicts_with = "url")]
    config: Option<PathBuf>,
    /// The destination's URL (s3://, gs://, az://, file://); credentials from the environment.
    #[arg(long)]
    url: Option<String>,
}

/// `ltxfs backup` subcommands.
#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Per database: the earliest and latest restorable TXID and time, and the bytes held.
    List {
        #[command(flatten)]
        source: BackupSource,
        /// Only this database.
        #[arg(long)]
        name: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Read every object, check digests and checksums; exit 1 naming the first bad one.
    Verify {
        #[command(flatten)]
        source: BackupSource,
        /// Only this database.
        #[arg(long)]
        name: Option<String>,
        /// An age identity file, to check the contents of encrypted objects too.
        #[arg(long)]
        age_identity: Option<PathBuf>,
    },
}

/// Which running mount a tool works through.
#[derive(Debug, clap::Args)]
struct MountSelection {
    /// The mount (default: fuse.dir from the config, else the current directory
    /// when it is an ltxfs mount).
    #[arg(long)]
    mount: Option<PathBuf>,
    /// The config file that names the mount.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
}

/// Which node a command asks, and how it proves the cluster secret.
#[derive(Debug, clap::Args)]
struct NodeSelection {
    /// The node's API URL (default: the URL the node of the mount recorded in
    /// its data dir).
    #[arg(long)]
    url: Option<String>,
    /// The mount whose node to ask (default: fuse.dir from the config, else the
    /// current directory when it is an ltxfs mount).
    #[arg(long, conflicts_with = "url")]
    mount: Option<PathBuf>,
    /// The config file: the mount, its data dir, http.secret and http.tls
    /// (default: ./ltxfs.yml, then /etc/ltxfs.yml; LTXFS_SECRET also works).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum LtxCommand {
    /// Print an LTX file's header, pages with their checksums, and trailer.
    Dump {
        /// The LTX file.
        file: PathBuf,
    },
    /// Check an LTX file completely; on damage, name the field or byte offset.
    Verify {
        /// The LTX file.
        file: PathBuf,
    },
}

/// Parses `args` and runs the command; returns the exit status.
pub fn run(args: impl IntoIterator<Item = OsString>) -> i32 {
    let cli: Cli = match parse_args(args) {
        Ok(cli) => cli,
        Err(status) => return status,
    };
    match cli.command {
        Command::Mount {
            mount_point,
            config,
            no_expand_env,
            no_capture,
            command,
        } => run_mount(mount_point, config, !no_expand_env, !no_capture, command),
        Command::Status { node, json } => run_status(node, json),
        Command::Promote { node } => run_promote(node),
        Command::Ltx { command } => run_ltx(command),
        Command::Restore {
            name,
            output,
            source,
            txid,
            timestamp,
            if_not_exists,
            age_identity,
        } => backup_commands::run_restore(
            &source_destination(source, age_identity),
            &name,
            &output,
            (txid.as_deref(), timestamp.as_deref()),
            if_not_exists,
        ),
        Command::Backup {
            command: BackupCommand::List { source, name, json },
        } => backup_commands::run_list(&source_destination(source, None), name.as_deref(), json),
        Command::Backup {
            command:
                BackupCommand::Verify {
                    source,
                    name,
                    age_identity,
                },
        } => {
            backup_commands::run_verify(&source_destination(source, age_identity), name.as_deref())
        }
        Command::Export { name, path, mount } => run_tool(mount, |mount_dir| {
            tools::export(mount_dir, &name, &path).map(|summary| summary.to_string())
        }),
        Command::Import { name, path, mount } => run_tool(mount, |mount_dir| {
            tools::import(mount_dir, &name, &path).map(|summary| summary.to_string())
        }),
        Command::Bench { args } => run_bench(args),
    }
}

/// Parses `args` as `P`. For `--help`, or a usage error, prints what clap says
/// and gives the exit status (0, or [`EXIT_USAGE`]).
pub fn parse_args<P: Parser>(args: impl IntoIterator<Item = OsString>) -> Result<P, i32> {
    P::try_parse_from(args).map_err(|error| {
        let _ = error.print();
        if error.use_stderr() { EXIT_USAGE } else { 0 }
    })
}

/// The destination `--url` names, or the first of `--config`'s (or the default
/// config file's) `backup.destinations`, with the age identity file to open
/// encrypted objects with: `--age-identity`, else the config's.
fn source_destination(
    source: BackupSource,
    age_identity: Option<PathBuf>,
) -> Result<backup_commands::Source, i32> {
    if let Some(url) = source.url {
        return Ok(backup_commands::Source {
            destination: BackupDestination {
                url,
                ..BackupDestination::default()
            },
            age_identity,
        });
    }
    let loaded =
        config::load(source.config.as_deref(), true).map_err(|error| fail(EXIT_USAGE, &error))?;
    let backup = loaded.config.backup;
    let destination = backup.destinations.into_iter().next().ok_or_else(|| {
        eprintln!(
            "ltxfs: error: no backup destination: pass --url URL, or --config FILE with backup.destinations"
        );
        EXIT_USAGE
    })?;
    Ok(backup_commands::Source {
        destination,
        age_identity: age_identity.or(backup.encryption.age_identity_file),
    })
}

/// The program `ltxfs bench` runs: the benchmarks, built from `bench/` in
/// ltxfs's workspace.
const BENCH_PROGRAM: &str = "ltxfs-bench";

/// Runs `ltxfs-bench` with `args` in place of this process: the one beside
/// this executable, else the one on PATH. Its mounts run this executable
/// (`LTXFS_BIN`, unless set already). Returns only when it cannot run.
fn run_bench(args: Vec<OsString>) -> i32 {
    use std::os::unix::process::CommandExt;
    let this = std::env::current_exe().ok();
    let beside = this
        .as_deref()
        .and_then(std::path::Path::parent)
        .map(|dir| dir.join(BENCH_PROGRAM))
        .filter(|program| program.is_file());
    let program = beside.unwrap_or_else(|| PathBuf::from(BENCH_PROGRAM));
    let mut command = std::process::Command::new(&program);
    command.arg0("ltxfs bench").args(args);
    if let Some(this) = this.filter(|_| std::env::var_os("LTXFS_BIN").is_none()) {
        command.env("LTXFS_BIN", this);
    }
    let error = command.exec();
    if error.kind() == std::io::ErrorKind::NotFound {
        eprintln!(
            "ltxfs: error: `ltxfs bench` runs {BENCH_PROGRAM}, which is neither beside this \
             executable nor on PATH: build it with `cargo build --release -p {BENCH_PROGRAM}` \
             (without --release beside a debug build of ltxfs)"
        );
        return EXIT_FAILURE;
    }
    eprintln!("ltxfs: error: could not run {}: {error}", program.display());
    EXIT_FAILURE
}

/// Runs a tool against the mount named by `--mount`, the config's fuse.dir, or
/// the current directory.
fn run_tool(
    selection: MountSelection,
    tool: impl FnOnce(&std::path::Path) -> Result<String, tools::ToolError>,
) -> i32 {
    let config = match config::load(selection.config.as_deref(), true) {
        Ok(loaded) => loaded.config,
        Err(error) => return fail(EXIT_USAGE, &error),
    };
    let Some(mount_dir) = selected_mount(selection.mount, &config) else {
        eprintln!(
            "ltxfs: error: no mount given: pass --mount DIR, set fuse.dir in ltxfs.yml, or run in the mount"
        );
        return EXIT_USAGE;
    };
    match tool(&mount_dir) {
        Ok(summary) => {
            println!("{summary}");
            0
        }
        Err(error) => fail(EXIT_FAILURE, &error),
    }
}

/// The mount a command works through: `--mount`, the config's fuse.dir, or the
/// current directory when it is an ltxfs mount.
fn selected_mount(explicit: Option<PathBuf>, config: &config::Config) -> Option<PathBuf> {
    explicit.or_else(|| config.fuse.dir.clone()).or_else(|| {
        let here = std::env::current_dir().ok()?;
        mountinfo::find(&here)
            .ok()
            .flatten()
            .filter(mountinfo::MountEntry::is_ltxfs)
            .map(|_| here)
    })
}

/// The URL and credentials of the node `selection` names.
fn selected_node(selection: NodeSelection) -> Result<(String, ClientCredentials), i32> {
    let config = config::load(selection.config.as_deref(), true)
        .map_err(|error| fail(EXIT_USAGE, &error))?
        .config;
    let credentials = ClientCredentials::new(
        ClusterKeys::new(config.http.secrets.clone())
            .accepting_unsigned(config.http.accept_unsigned),
        config.http.tls.as_ref(),
    )
    .map_err(|error| fail(EXIT_USAGE, &error))?;
    if let Some(url) = selection.url {
        return Ok((url, credentials));
    }
    let Some(mount_dir) = selected_mount(selection.mount, &config) else {
        eprintln!(
            "ltxfs: error: no node given: pass --url URL or --mount DIR, set fuse.dir in ltxfs.yml, or run in the mount"
        );
        return Err(EXIT_USAGE);
    };
    let mount_dir = std::path::absolute(&mount_dir).unwrap_or(mount_dir);
    let data_dir = match &config.data.dir {
        Some(dir) => dir.clone(),
        None => mount::default_data_dir(&mount_dir),
    };
    let recorded = data_dir.join(config::API_URL_FILE);
    match std::fs::read_to_string(&recorded) {
        Ok(url) if !url.trim().is_empty() => Ok((url.trim().to_string(), credentials)),
        _ => {
            eprintln!(
                "ltxfs: error: no node API URL recorded in {}: is ltxfs running on {}? Pass --url URL otherwise",
                recorded.display(),
                mount_dir.display()
            );
            Err(EXIT_USAGE)
        }
    }
}

/// Runs one call to a node on a runtime of its own, failing with `ReplicationError`s.
fn call_node<T>(call: impl Future<Output = Result<T, ReplicationError>>) -> Result<T, i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| fail(EXIT_FAILURE, &error))?;
    runtime.block_on(call).map_err(|error| match error {
        ReplicationError::InvalidUrl { .. } => fail(EXIT_USAGE, &error),
        error => fail(EXIT_FAILURE, &error),
    })
}

fn run_promote(selection: NodeSelection) -> i32 {
    let (url, credentials) = match selected_node(selection) {
        Ok(node) => node,
        Err(status) => return status,
    };
    let started = std::time::Instant::now();
    match call_node(replication::request_promote(&url, &credentials)) {
        Ok(previous) => {
            println!(
                "this node is the primary; it took over from {previous} in {} ms",
                started.elapsed().as_millis()
            );
            0
        }
        Err(status) => status,
    }
}

fn run_status(selection: NodeSelection, json: bool) -> i32 {
    let (url, credentials) = match selected_node(selection) {
        Ok(node) => node,
        Err(status) => return status,
    };
    match call_node(replication::fetch_status(&url, &credentials)) {
        Ok(status) if json => {
            println!("{}", status.to_json());
            0
        }
        Ok(status) => {
            println!("{status}");
            0
        }
        Err(status) => status,
    }
}

fn run_ltx(command: LtxCommand) -> i32 {
    let result = match command {
        LtxCommand::Dump { file } => ltx::dump_file(&file, &mut std::io::stdout().lock()),
        LtxCommand::Verify { file } => {
            ltx::verify_file(&file).inspect(|summary| println!("{summary}"))
        }
    };
    match result {
        Ok(_) => 0,
        Err(error) => fail(EXIT_FAILURE, &error),
    }
}

fn run_mount(
    mount_point: Option<PathBuf>,
    config_path: Option<PathBuf>,
    expand_env: bool,
    capture: bool,
    command: Vec<String>,
) -> i32 {
    let loaded = match config::load(config_path.as_deref(), expand_env) {
        Ok(loaded) => loaded,
        Err(error) => return fail(EXIT_USAGE, &error),
    };
    init_logging(&loaded.config.log, loaded.config.fuse.debug);
    match &loaded.path {
        Some(path) => tracing::debug!(config = %path.display(), "config loaded"),
        None => tracing::debug!("no ltxfs.yml found; using the default configuration"),
    }
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    let command = if command.is_empty() {
        None
    } else {
        match ExecCommand::from_argv(&command) {
            Ok(command) => Some(command),
            Err(error) => return fail(EXIT_USAGE, &error),
        }
    };
    let request = MountRequest {
        mount_point,
        config: loaded.config,
        command,
        capture,
    };
    match mount::run(request) {
        Ok(code) => code,
        Err(error @ MountError::Usage(_)) => fail(EXIT_USAGE, &error),
        Err(error) => fail(EXIT_FAILURE, &error),
    }
}

pub fn fail(code: i32, error: &dyn std::error::Error) -> i32 {
    eprintln!("ltxfs: error: {}", error_chain(error).replace('\n', " "));
    code
}

/// Sets up logging to stderr as `log.*` says. `LTXFS_LOG` (an `EnvFilter`
/// directive such as `ltxfs=debug`) overrides the level; `fuse.debug` adds the
/// FUSE request trace.
pub fn init_logging(log: &LogConfig, fuse_debug: bool) {
    let level = if log.debug { "debug" } else { "info" };
    let fuser_level = if fuse_debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LTXFS_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},fuser={fuser_level}"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let _ = match (log.format, log.timestamp) {
        (LogFormat::Json, true) => builder.json().try_init(),
        (LogFormat::Json, false) => builder.json().without_time().try_init(),
        (LogFormat::Text, true) => builder.try_init(),
        (LogFormat::Text, false) => builder.without_time().try_init(),
    };
}
