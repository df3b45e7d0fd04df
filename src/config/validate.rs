//! Checks that need the whole parsed configuration: required companions
//! (`lease.type: consul` needs `lease.consul.url`), value ranges, address
//! syntax, and conflicts between settings.
//!
//! Each problem is reported as a [`Problem`] naming the dotted key it is
//! about (for example `lease.consul.url` or `exec[1]`) and saying what to do.
//! The caller adds the file and line.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::{Config, LeaseType};

/// One validation problem: the key it is about and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub key: String,
    pub message: String,
}

fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        key: key.into(),
        message: message.into(),
    }
}

/// Consul refuses session TTLs outside 10 seconds to 24 hours.
const CONSUL_MIN_TTL: Duration = Duration::from_secs(10);
const CONSUL_MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Returns the first problem in `config`, checking sections in file order.
pub(crate) fn first_problem(config: &Config) -> Option<Problem> {
    check_exec(config)
        .or_else(|| check_dirs(config))
        .or_else(|| check_data(config))
        .or_else(|| check_lease(config))
        .or_else(|| check_http(config))
        .or_else(|| check_proxy(config))
        .or_else(|| check_backup(config))
}

/// The URL schemes `backup.destinations[].url` accepts.
pub(crate) const BACKUP_SCHEMES: &[&str] = &["s3", "gs", "az", "file"];

fn check_backup(config: &Config) -> Option<Problem> {
    let backup = &config.backup;
    for (index, destination) in backup.destinations.iter().enumerate() {
        let key = format!("backup.destinations[{index}].url");
        let url = &destination.url;
        if url.is_empty() {
            return Some(problem(
                key,
                "is required: `s3://bucket/prefix`, `gs://bucket/prefix`, \
                 `az://container/prefix` or `file:///absolute/path`",
            ));
        }
        let Ok(parsed) = Url::parse(url) else {
            return Some(problem(
                key,
                format!("`{url}` is not a URL; write `s3://bucket/prefix` or `file:///path`"),
            ));
        };
        let scheme = parsed.scheme();
        if !BACKUP_SCHEMES.contains(&scheme) {
            return Some(problem(
                key,
                format!("unknown scheme `{scheme}://`; use one of s3://, gs://, az:// or file://"),
            ));
        }
        if scheme == "file" {
            if parsed.to_file_path().is_err() {
                return Some(problem(
                    key,
                    format!("`{url}` must name an absolute path, as in `file:///var/backups/db`"),
                ));
            }
        } else if parsed.host_str().unwrap_or("").is_empty() {
            return Some(problem(
                key,
                format!("`{url}` names no bucket; write `{scheme}://BUCKET/prefix`"),
            ));
        }
        if let Some(endpoint) = &destination.endpoint
            && let Some(problem) =
                check_http_url(&format!("backup.destinations[{index}].endpoint"), endpoint)
        {
            return Some(problem);
        }
    }
    if backup.sync_interval.is_zero() {
        return Some(problem(
            "backup.sync-interval",
            "must be longer than zero; the default is `1s`",
        ));
    }
    if backup.snapshot_interval.is_zero() {
        return Some(problem(
            "backup.snapshot-interval",
            "must be longer than zero; the default is `24h`",
        ));
    }
    let windows = &backup.compaction_windows;
    if windows.len() > super::MAX_BACKUP_COMPACTION_WINDOWS
        || windows
            .first()
            .is_some_and(|first| *first <= backup.sync_interval)
        || windows.windows(2).any(|pair| pair[0] >= pair[1])
    {
        return Some(problem(
            "backup.compaction-windows",
            format!(
                "must be at most {} windows, each longer than the one before and the first \
                 longer than `backup.sync-interval`; the default is `[10s, 5m, 1h]`",
                super::MAX_BACKUP_COMPACTION_WINDOWS
            ),
        ));
    }
    if backup.retention < backup.sync_interval {
        return Some(problem(
            "backup.retention",
            "must be at least `backup.sync-interval`; the default is `72h`",
        ));
    }
    if let Some(index) = backup
        .encryption
        .age_recipients
        .iter()
        .position(|key| !key.trim().starts_with("age1"))
    {
        return Some(problem(
            format!("backup.encryption.age-recipients[{index}]"),
            "is not an age X25519 public key; make one with `age-keygen` and give the \
             `age1...` line it prints",
        ));
    }
    if backup.restore_on_boot && backup.destinations.is_empty() {
        return Some(problem(
            "backup.restore-on-boot",
            "needs at least one entry in `backup.destinations` to restore from",
        ));
    }
    None
}

fn check_exec(config: &Config) -> Option<Problem> {
    config
        .exec
        .iter()
        .enumerate()
        .find_map(|(index, command)| match command.argv.first() {
            None => Some(problem(
                format!("exec[{index}]"),
                "the command is empty; write the program and its arguments in `cmd`, \
                 or remove this entry",
            )),
            Some(program) if program.is_empty() => Some(problem(
                format!("exec[{index}]"),
                "the program name is an empty string; write the program to run first",
            )),
            Some(_) => None,
        })
}

/// Removes `.` components and trailing separators so that paths written
/// differently compare equal. `..` is kept: resolving it needs the file
/// system, and these checks are only about obvious mistakes.
fn normalized(path: &Path) -> PathBuf {
    path.components()
        .filter(|component| !matches!(component, Component::CurDir))
        .collect()
}

fn check_dirs(config: &Config) -> Option<Problem> {
    let (Some(fuse_dir), Some(data_dir)) = (&config.fuse.dir, &config.data.dir) else {
        return None;
    };
    let (fuse_dir, data_dir) = (normalized(fuse_dir), normalized(data_dir));
    if fuse_dir == data_dir {
        return Some(problem(
            "data.dir",
            format!(
                "`{}` is also `fuse.dir`; the data directory must be a different directory \
                 outside the mount, for example `/var/lib/ltxfs`",
                data_dir.display()
            ),
        ));
    }
    if data_dir.starts_with(&fuse_dir) {
        return Some(problem(
            "data.dir",
            format!(
                "`{}` is inside the mount `fuse.dir: {}`; put the data directory outside the \
                 mount, for example `/var/lib/ltxfs`",
                data_dir.display(),
                fuse_dir.display()
            ),
        ));
    }
    None
}

fn check_data(config: &Config) -> Option<Problem> {
    if config.data.retention_monitor_interval.is_zero() {
        return Some(problem(
            "data.retention-monitor-interval",
            "must be longer than zero; the default is `1m`",
        ));
    }
    if config.data.max_size == Some(0) {
        return Some(problem(
            "data.max-size",
            "must be larger than zero; remove it to bound retention by time only",
        ));
    }
    None
}

/// Checks that `url` is an `http://` or `https://` URL with a host.
fn check_http_url(key: &str, url: &str) -> Option<Problem> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    let host_present = rest.is_some_and(|rest| {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let host = authority.rsplit('@').next().unwrap_or("");
        !host.is_empty() && !host.starts_with(':')
    });
    if host_present {
        None
    } else {
        Some(problem(
            key,
            format!("`{url}` is not an http:// or https:// URL with a host"),
        ))
    }
}

fn check_lease(config: &Config) -> Option<Problem> {
    let lease = &config.lease;
    if let Some(url) = &lease.advertise_url {
        if let Some(found) = check_http_url("lease.advertise-url", url) {
            return Some(found);
        }
    }
    match lease.lease_type {
        LeaseType::Static => {
            if !lease.candidate && lease.advertise_url.is_none() {
                return Some(problem(
                    "lease.advertise-url",
                    "a replica in a static lease (`lease.candidate: false`) must know the \
                     primary; set `lease.advertise-url` to the primary's URL, for example \
                     `http://primary:20202`",
                ));
            }
        }
        LeaseType::Consul => {
            let consul = &lease.consul;
            let Some(url) = &consul.url else {
                return Some(problem(
                    "lease.consul.url",
                    "is required with `lease.type: consul`; set it to the Consul URL \
                     (on Fly.io, `${FLY_CONSUL_URL}`)",
                ));
            };
            if let Some(found) = check_http_url("lease.consul.url", url) {
                return Some(found);
            }
            if consul.key.is_none() {
                return Some(problem(
                    "lease.consul.key",
                    "is required with `lease.type: consul`; set it to a key unique to this \
                     cluster, for example `ltxfs/${FLY_APP_NAME}`",
                ));
            }
            if consul.ttl < CONSUL_MIN_TTL || consul.ttl > CONSUL_MAX_TTL {
                return Some(problem(
                    "lease.consul.ttl",
                    format!(
                        "{:?} is outside the range Consul accepts; use a value from `10s` to `24h`",
                        consul.ttl
                    ),
                ));
            }
        }
        LeaseType::Etcd => {
            let etcd = &lease.etcd;
            if etcd.endpoints.is_empty() {
                return Some(problem(
                    "lease.etcd.endpoints",
                    "is required with `lease.type: etcd`; list the etcd client URLs, for \
                     example `[\"http://etcd-1:2379\"]`",
                ));
            }
            if let Some(index) = etcd.endpoints.iter().position(String::is_empty) {
                return Some(problem(
                    format!("lease.etcd.endpoints[{index}]"),
                    "is empty; write an etcd client URL such as `http://etcd-1:2379`",
                ));
            }
            if etcd.key.is_none() {
                return Some(problem(
                    "lease.etcd.key",
                    "is required with `lease.type: etcd`; set it to a key unique to this \
                     cluster, for example `ltxfs/myapp/primary`",
                ));
            }
            if etcd.ttl < Duration::from_secs(1) || etcd.ttl.subsec_nanos() != 0 {
                return Some(problem(
                    "lease.etcd.ttl",
                    format!(
                        "{:?} cannot be an etcd lease TTL; etcd counts whole seconds, so use a \
                         whole number of seconds of at least `1s`, such as `10s`",
                        etcd.ttl
                    ),
                ));
            }
        }
    }
    None
}

/// Splits `host:port` (host may be empty, a name, an IPv4 address or a
/// bracketed IPv6 address) and returns the host and port.
fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host_is_valid = if let Some(inner) = host.strip_prefix('[') {
        inner.ends_with(']') && inner.len() > 1
    } else {
        !host.contains([':', '/', ' '])
    };
    host_is_valid.then_some((host, port))
}

fn check_listen_address(key: &str, address: &str) -> Option<Problem> {
    if split_host_port(address).is_some() {
        return None;
    }
    let hint = if address.contains("://") {
        " (without a scheme such as http://)"
    } else {
        ""
    };
    Some(problem(
        key,
        format!(
            "`{address}` is not a listen address; write `[host]:port`{hint}, for example \
             `:8080` or `127.0.0.1:8080`"
        ),
    ))
}

fn check_http(config: &Config) -> Option<Problem> {
    let http = &config.http;
    check_listen_address("http.addr", &http.addr)
        .or_else(|| check_secrets(config))
        .or_else(|| {
            let tls = http.tls.as_ref()?;
            if tls.cert.as_os_str().is_empty() || tls.key.as_os_str().is_empty() {
                return Some(problem(
                    "http.tls",
                    "http.tls needs both `cert` and `key` (PEM files); `ca` makes it mutual TLS",
                ));
            }
            None
        })
        .or_else(|| {
            (http.metrics_secret && http.secrets.is_empty()).then(|| {
                problem(
                    "http.metrics-secret",
                    "http.metrics-secret: true needs a cluster secret (http.secret or LTXFS_SECRET)",
                )
            })
        })
        .or_else(|| {
            (http.accept_unsigned && http.secrets.is_empty()).then(|| {
                problem(
                    "http.accept-unsigned",
                    "http.accept-unsigned: true is for turning a cluster secret on; set http.secret (or LTXFS_SECRET) too",
                )
            })
        })
}

/// Cluster secrets must be long enough not to be guessed.
pub(crate) fn check_secrets(config: &Config) -> Option<Problem> {
    let short = config
        .http
        .secrets
        .iter()
        .position(|secret| secret.expose().chars().count() < super::MIN_SECRET_LEN)?;
    let key = if config.http.secrets.len() > 1 {
        format!("http.secrets[{short}]")
    } else {
        "http.secret".to_string()
    };
    Some(problem(
        key,
        format!(
            "a cluster secret needs at least {} characters; make one with `openssl rand -hex 32`",
            super::MIN_SECRET_LEN
        ),
    ))
}

/// Hosts that mean "this machine" when two addresses are compared.
fn is_local_host(host: &str) -> bool {
    matches!(
        host,
        "" | "localhost" | "127.0.0.1" | "0.0.0.0" | "[::]" | "[::1]"
    )
}

fn check_proxy(config: &Config) -> Option<Problem> {
    let proxy = &config.proxy;
    if proxy.addr.is_none() && proxy.target.is_none() && proxy.db.is_empty() {
        return None;
    }
    let Some(addr) = &proxy.addr else {
        return Some(problem(
            "proxy.addr",
            "is required when the proxy is configured; set the address the proxy listens on, \
             for example `:8080`, or remove the `proxy` section",
        ));
    };
    if let Some(found) = check_listen_address("proxy.addr", addr) {
        return Some(found);
    }
    let Some(target) = &proxy.target else {
        return Some(problem(
            "proxy.target",
            "is required with `proxy.addr`; set it to your application's host and port, for \
             example `localhost:8081`",
        ));
    };
    let target_parts = split_host_port(target).filter(|(_, port)| *port != 0);
    let Some((target_host, target_port)) = target_parts else {
        let hint = if target.contains("://") {
            " without a scheme such as http://"
        } else {
            ""
        };
        return Some(problem(
            "proxy.target",
            format!(
                "`{target}` is not a host and port; write it as `host:port`{hint}, for example \
                 `localhost:8081`"
            ),
        ));
    };
    if proxy.db.is_empty() {
        return Some(problem(
            "proxy.db",
            "is required with `proxy.addr`; name the database whose transaction ID the proxy \
             tracks for read-your-writes consistency, for example `db` or `app.db`",
        ));
    }
    for (index, name) in proxy.db.iter().enumerate() {
        if name.contains('/') || name == "." || name == ".." {
            return Some(problem(
                format!("proxy.db[{index}]"),
                format!(
                    "`{name}` is not a database name; write the file name of a database in the \
                     mount's top directory, without `/`"
                ),
            ));
        }
    }
    for (key, patterns) in [
        ("proxy.passthrough", &proxy.passthrough),
        ("proxy.always-forward", &proxy.always_forward),
    ] {
        if let Some(index) = patterns.iter().position(String::is_empty) {
            return Some(problem(
                format!("{key}[{index}]"),
                "is an empty pattern; write a path pattern such as `/static/*` or `*.png`, \
                 or remove the entry",
            ));
        }
    }
    if proxy.primary_redirect_timeout.is_zero() {
        return Some(problem(
            "proxy.primary-redirect-timeout",
            "must be longer than zero; the default is `5s`",
        ));
    }
    let (addr_host, addr_port) = split_host_port(addr)?;
    if is_local_host(target_host) && target_port == addr_port && is_local_host(addr_host) {
        return Some(problem(
            "proxy.target",
            format!(
                "`{target}` is the proxy's own address `{addr}`; the proxy would forward to \
                 itself. Run your application on another port and point `proxy.target` at it"
            ),
        ));
    }
    if let Some((http_host, http_port)) = split_host_port(&config.http.addr) {
        let same_host = http_host == addr_host || http_host.is_empty() || addr_host.is_empty();
        if http_port == addr_port && addr_port != 0 && same_host {
            return Some(problem(
                "proxy.addr",
                format!(
                    "`{addr}` uses the same port as `http.addr: {}`; give the proxy its own port",
                    config.http.addr
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port(":8080"), Some(("", 8080)));
        assert_eq!(split_host_port("localhost:8081"), Some(("localhost", 8081)));
        assert_eq!(split_host_port("[::]:20202"), Some(("[::]", 20202)));
        assert_eq!(split_host_port("0.0.0.0:0"), Some(("0.0.0.0", 0)));
        for bad in [
            "8080",
            "host:",
            "host:99999",
            "http://x:80",
            "::1:80",
            "[]:80",
            "a b:1",
        ] {
            assert_eq!(split_host_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn http_urls() {
        assert!(check_http_url("k", "http://myhost:20202").is_none());
        assert!(check_http_url("k", "https://:token@consul.fly.io/app").is_none());
        for bad in ["myhost:20202", "http://", "ftp://x", "http://:80/", ""] {
            assert!(check_http_url("k", bad).is_some(), "{bad}");
        }
    }
}
