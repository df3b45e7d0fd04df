//! The file's shape as serde reads it, before defaults are applied.
//!
//! Every setting is optional here (`None` means "not written, or written as
//! an empty YAML value"), so that defaults live in one place, the `Default`
//! impls of the public types, and `key:` with nothing after it means "use
//! the default", as it does in LiteFS. Every struct denies unknown fields,
//! so a typo is an error naming the key and its line.
//!
//! Custom value types ([`Flag`], [`GoDuration`], [`ByteSize`], [`RawExec`],
//! [`OneOrMany`], [`LiteFsOnly`]) produce their errors inside serde's
//! visitors. That matters: only errors raised while serde_norway is reading
//! a value get that value's key path and line attached.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

use super::values::{parse_byte_size, parse_duration, split_command_line};
use super::{ExecCommand, FuseLocks, LeaseType, LogFormat, ProxyMode};

/// The text that marks an error from [`LiteFsOnly`], so that the caller can
/// turn it into [`ConfigError::UnsupportedLiteFsKey`](super::ConfigError).
pub(crate) const LITEFS_ONLY_MARKER: &str = "ltxfs-internal: LiteFS-only key";

/// Keys that LiteFS accepts but ltxfs does not support yet, with a hint for
/// each. Any value under these keys is rejected with a specific message.
pub(crate) const LITEFS_ONLY_KEYS: &[(&str, &str)] = &[
    (
        "backup.type",
        "LiteFS Cloud is gone; ltxfs backs up to object storage itself: list them under `backup.destinations` (see docs/backup.md).",
    ),
    (
        "backup.auth-token",
        "LiteFS Cloud is gone; give object-storage credentials under `backup.destinations` instead.",
    ),
    (
        "backup.path",
        "write the destination as `backup.destinations: [{url: \"file:///abs/path\"}]`.",
    ),
    (
        "backup.url",
        "write the destination as `backup.destinations: [{url: ...}]`.",
    ),
    ("backup.delay", "ltxfs uses `backup.sync-interval`."),
    (
        "backup.full-sync-interval",
        "ltxfs uses `backup.snapshot-interval`.",
    ),
    (
        "tracing",
        "For more detailed logs, set `log.debug: true` instead.",
    ),
    ("http.snapshot-timeout", ""),
    ("proxy.read-timeout", ""),
    ("proxy.read-header-timeout", ""),
    ("proxy.write-timeout", ""),
    ("proxy.idle-timeout", ""),
    (
        "lease.databases",
        "ltxfs replicates every database in the mount.",
    ),
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawConfig {
    pub exit_on_error: Option<Flag>,
    pub skip_sync: Option<Flag>,
    pub strict_verify: Option<Flag>,
    pub exec: Option<RawExec>,
    pub fuse: Option<RawFuse>,
    pub data: Option<RawData>,
    pub lease: Option<RawLease>,
    pub http: Option<RawHttp>,
    pub replication: Option<RawReplication>,
    pub proxy: Option<RawProxy>,
    pub log: Option<RawLog>,
    pub backup: Option<RawBackup>,
    #[serde(default, rename = "tracing")]
    pub _tracing: LiteFsOnly,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawFuse {
    pub dir: Option<String>,
    pub allow_other: Option<Flag>,
    pub debug: Option<Flag>,
    pub locks: Option<Choice<FuseLocks>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawData {
    pub dir: Option<String>,
    pub compress: Option<Flag>,
    pub retention: Option<GoDuration>,
    pub retention_monitor_interval: Option<GoDuration>,
    pub max_size: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawLease {
    #[serde(rename = "type")]
    pub lease_type: Option<Choice<LeaseType>>,
    pub hostname: Option<String>,
    pub advertise_url: Option<String>,
    pub candidate: Option<Flag>,
    pub promote: Option<Flag>,
    pub reconnect_delay: Option<GoDuration>,
    pub demote_delay: Option<GoDuration>,
    pub consul: Option<RawConsul>,
    pub etcd: Option<RawEtcd>,
    #[serde(default, rename = "databases")]
    pub _databases: LiteFsOnly,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawConsul {
    pub url: Option<String>,
    pub key: Option<String>,
    pub ttl: Option<GoDuration>,
    pub lock_delay: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawEtcd {
    pub endpoints: Option<OneOrMany>,
    pub key: Option<String>,
    pub ttl: Option<GoDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawHttp {
    pub addr: Option<String>,
    pub secret: Option<String>,
    pub secrets: Option<Vec<String>>,
    pub tls: Option<RawHttpTls>,
    pub metrics_secret: Option<Flag>,
    pub accept_unsigned: Option<Flag>,
    #[serde(default, rename = "snapshot-timeout")]
    pub _snapshot_timeout: LiteFsOnly,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawHttpTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawReplication {
    pub synchronous: Option<Flag>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawProxy {
    pub addr: Option<String>,
    pub target: Option<String>,
    pub db: Option<OneOrMany>,
    pub debug: Option<Flag>,
    pub passthrough: Option<OneOrMany>,
    pub always_forward: Option<OneOrMany>,
    pub max_lag: Option<GoDuration>,
    pub primary_redirect_timeout: Option<GoDuration>,
    pub mode: Option<Choice<ProxyMode>>,
    #[serde(default, rename = "read-timeout")]
    pub _read_timeout: LiteFsOnly,
    #[serde(default, rename = "read-header-timeout")]
    pub _read_header_timeout: LiteFsOnly,
    #[serde(default, rename = "write-timeout")]
    pub _write_timeout: LiteFsOnly,
    #[serde(default, rename = "idle-timeout")]
    pub _idle_timeout: LiteFsOnly,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawBackup {
    pub destinations: Option<Vec<RawDestination>>,
    pub sync_interval: Option<GoDuration>,
    pub snapshot_interval: Option<GoDuration>,
    pub compaction_windows: Option<Vec<GoDuration>>,
    pub retention: Option<GoDuration>,
    pub restore_on_boot: Option<Flag>,
    pub encryption: Option<RawEncryption>,
    #[serde(default, rename = "type")]
    pub _type: LiteFsOnly,
    #[serde(default, rename = "auth-token")]
    pub _auth_token: LiteFsOnly,
    #[serde(default, rename = "path")]
    pub _path: LiteFsOnly,
    #[serde(default, rename = "url")]
    pub _url: LiteFsOnly,
    #[serde(default, rename = "delay")]
    pub _delay: LiteFsOnly,
    #[serde(default, rename = "full-sync-interval")]
    pub _full_sync_interval: LiteFsOnly,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawEncryption {
    pub age_recipients: Option<OneOrMany>,
    pub age_identity_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawDestination {
    pub url: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub service_account: Option<String>,
    pub account_name: Option<String>,
    pub account_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawLog {
    pub format: Option<Choice<LogFormat>>,
    pub debug: Option<Flag>,
    pub timestamp: Option<Flag>,
}

/// A boolean, accepting the YAML 1.1 spellings that LiteFS's YAML library
/// (go-yaml v3) accepts for boolean settings: `true`/`false` in any of
/// three capitalisations, `yes`/`no`, `on`/`off` and `y`/`n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl Visitor<'_> for FlagVisitor {
            type Value = Flag;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("true or false")
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<Flag, E> {
                Ok(Flag(value))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Flag, E> {
                match value {
                    "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "y"
                    | "Y" => Ok(Flag(true)),
                    "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF"
                    | "n" | "N" => Ok(Flag(false)),
                    other => Err(E::custom(format!(
                        "expected true or false, found `{other}`"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(FlagVisitor)
    }
}

/// A duration in Go syntax (`10s`, `1h30m`); see
/// [`parse_duration`].
///
/// A bare `0` means zero. Any other bare number is rejected, because Go's
/// YAML library would read `60` as 60 nanoseconds, which is never what is
/// meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GoDuration(pub Duration);

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl DurationVisitor {
            fn bare_number<E: de::Error>(number: impl fmt::Display) -> E {
                E::custom(format!(
                    "invalid duration `{number}`: a number needs a unit, for example `{number}s` \
                     for seconds or `{number}ms` for milliseconds"
                ))
            }
        }
        impl Visitor<'_> for DurationVisitor {
            type Value = GoDuration;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a duration such as 10s, 5m, 1h30m or 250ms")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<GoDuration, E> {
                parse_duration(value).map(GoDuration).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<GoDuration, E> {
                match value {
                    0 => Ok(GoDuration(Duration::ZERO)),
                    other => Err(Self::bare_number(other)),
                }
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<GoDuration, E> {
                match value {
                    0 => Ok(GoDuration(Duration::ZERO)),
                    other => Err(Self::bare_number(other)),
                }
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<GoDuration, E> {
                Err(Self::bare_number(value))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// A byte size (`512MiB`, `1GB`, or a plain number of bytes); see
/// [`parse_byte_size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ByteSizeVisitor;
        impl Visitor<'_> for ByteSizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a byte size such as 512MiB or 1GB")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<ByteSize, E> {
                parse_byte_size(value).map(ByteSize).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(value))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<ByteSize, E> {
                u64::try_from(value)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid byte size `{value}`: it is negative")))
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "invalid byte size `{value}`: write a whole number of bytes or add a unit, \
                     for example `{value}GiB`"
                )))
            }
        }
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

/// One of a fixed set of words, such as `lease.type`. The error for any
/// other word lists the accepted ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Choice<T>(pub T);

/// The words a [`Choice`] accepts.
pub(crate) trait Choices: Sized + Copy + 'static {
    /// Every accepted word with its value.
    const CHOICES: &'static [(&'static str, Self)];
}

impl<'de, T: Choices> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChoiceVisitor<T>(std::marker::PhantomData<T>);
        impl<T: Choices> Visitor<'_> for ChoiceVisitor<T> {
            type Value = Choice<T>;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("one of ")?;
                formatter.write_str(&choice_list::<T>())
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Choice<T>, E> {
                T::CHOICES
                    .iter()
                    .find(|(word, _)| *word == value)
                    .map(|(_, choice)| Choice(*choice))
                    .ok_or_else(|| {
                        E::custom(format!(
                            "`{value}` is not one of the accepted values: {}",
                            choice_list::<T>()
                        ))
                    })
            }
        }
        deserializer.deserialize_str(ChoiceVisitor(std::marker::PhantomData))
    }
}

fn choice_list<T: Choices>() -> String {
    T::CHOICES
        .iter()
        .map(|(word, _)| format!("`{word}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A single string or a list of strings, as `proxy.db` accepts. An empty
/// string stands for no entry, so an unset environment variable in
/// `db: "${DB}"` means "no database" rather than a database named "".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OneOrMany(pub Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OneOrManyVisitor;
        impl<'de> Visitor<'de> for OneOrManyVisitor {
            type Value = OneOrMany;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(if value.is_empty() {
                    Vec::new()
                } else {
                    vec![value.to_owned()]
                }))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![value.to_string()]))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![value.to_string()]))
            }
            fn visit_unit<E: de::Error>(self) -> Result<OneOrMany, E> {
                Ok(OneOrMany::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<OneOrMany, A::Error> {
                let mut values = Vec::new();
                while let Some(value) = items.next_element::<String>()? {
                    values.push(value);
                }
                Ok(OneOrMany(values))
            }
        }
        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

/// The `exec` setting: one command line, or a list whose items are command
/// lines or `{cmd, if-candidate}` mappings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RawExec(pub Vec<ExecCommand>);

/// One `exec` list item in mapping form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawExecItem {
    cmd: Option<CommandLine>,
    if_candidate: Option<Flag>,
}

/// A command line, split into arguments while serde reads it so that a
/// quoting error gets the key and line attached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CommandLine(Vec<String>);

impl<'de> Deserialize<'de> for CommandLine {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CommandLineVisitor;
        impl Visitor<'_> for CommandLineVisitor {
            type Value = CommandLine;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a command line such as \"myapp -addr :8081\"")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<CommandLine, E> {
                split_command_line(value)
                    .map(CommandLine)
                    .map_err(E::custom)
            }
        }
        deserializer.deserialize_str(CommandLineVisitor)
    }
}

/// One `exec` list item: a command line or a `{cmd, if-candidate}` mapping.
struct RawExecEntry(ExecCommand);

impl<'de> Deserialize<'de> for RawExecEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = RawExecEntry;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a command line or a mapping with `cmd` and `if-candidate`")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawExecEntry, E> {
                let argv = split_command_line(value).map_err(E::custom)?;
                Ok(RawExecEntry(ExecCommand {
                    argv,
                    if_candidate: false,
                }))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawExecEntry, A::Error> {
                let item = RawExecItem::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawExecEntry(ExecCommand {
                    argv: item.cmd.unwrap_or_default().0,
                    if_candidate: item.if_candidate.is_some_and(|flag| flag.0),
                }))
            }
        }
        deserializer.deserialize_any(EntryVisitor)
    }
}

impl<'de> Deserialize<'de> for RawExec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ExecVisitor;
        impl<'de> Visitor<'de> for ExecVisitor {
            type Value = RawExec;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str(
                    "a command line, or a list of commands each written as a command line or \
                     as a mapping with `cmd` and `if-candidate`",
                )
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawExec, E> {
                let argv = split_command_line(value).map_err(E::custom)?;
                // An empty command line, such as an unset "${APP_CMD}", means
                // no command, as it does in LiteFS.
                if argv.is_empty() {
                    return Ok(RawExec::default());
                }
                Ok(RawExec(vec![ExecCommand {
                    argv,
                    if_candidate: false,
                }]))
            }
            fn visit_unit<E: de::Error>(self) -> Result<RawExec, E> {
                Ok(RawExec::default())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<RawExec, A::Error> {
                let mut commands = Vec::new();
                while let Some(RawExecEntry(command)) = items.next_element()? {
                    commands.push(command);
                }
                Ok(RawExec(commands))
            }
        }
        deserializer.deserialize_any(ExecVisitor)
    }
}

/// A LiteFS key that ltxfs does not support yet. Absent is fine (the
/// default); any value, even an empty one, is an error marked with
/// [`LITEFS_ONLY_MARKER`] that the caller rewrites into a helpful message.
/// Fields of this type are named with a leading `_` because nothing reads
/// them: they exist only to reject the key.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiteFsOnly;

impl<'de> Deserialize<'de> for LiteFsOnly {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RejectVisitor;
        impl RejectVisitor {
            fn reject<E: de::Error>() -> Result<LiteFsOnly, E> {
                Err(E::custom(LITEFS_ONLY_MARKER))
            }
        }
        impl<'de> Visitor<'de> for RejectVisitor {
            type Value = LiteFsOnly;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str(LITEFS_ONLY_MARKER)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<LiteFsOnly, E> {
                Self::reject()
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<LiteFsOnly, E> {
                Self::reject()
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<LiteFsOnly, E> {
                Self::reject()
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<LiteFsOnly, E> {
                Self::reject()
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<LiteFsOnly, E> {
                Self::reject()
            }
            fn visit_unit<E: de::Error>(self) -> Result<LiteFsOnly, E> {
                Self::reject()
            }
            fn visit_none<E: de::Error>(self) -> Result<LiteFsOnly, E> {
                Self::reject()
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<LiteFsOnly, A::Error> {
                Self::reject()
            }
            fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<LiteFsOnly, A::Error> {
                Self::reject()
            }
            fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<LiteFsOnly, A::Error> {
                Self::reject()
            }
        }
        deserializer.deserialize_any(RejectVisitor)
    }
}
