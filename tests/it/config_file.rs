//! Tests of the `ltxfs.yml` configuration through the public API: LiteFS
//! files parse unchanged, defaults, error messages (key and line), LiteFS
//! keys ltxfs does not support, environment expansion, durations, `exec`
//! forms, the file search order and validation.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ltxfs::config::{
    self, Config, ConfigError, ExecCommand, LeaseType, LogFormat, ProxyMode, parse, parse_with_env,
};

/// A `litefs.yml` as a Fly.io app with Consul leases would have it, modelled
/// on the LiteFS example app and documentation.
const FLY_CONSUL_LITEFS_YML: &str = r#"# The FUSE section handles settings on the FUSE file system.
fuse:
  # Required. This is the mount directory that applications will
  # use to access their SQLite databases.
  dir: "/litefs"

# The data section describes where internal data is stored.
data:
  dir: "/var/lib/litefs"

# Keep the machine running on errors so it can be inspected with `fly ssh`.
exit-on-error: false

# The proxy provides read-your-writes consistency and forwards writes.
proxy:
  addr: ":8080"
  target: "localhost:8081"
  db: "db"
  passthrough:
    - "*.ico"
    - "*.png"

# Run migrations on candidates only, then start the app.
exec:
  - cmd: "bin/rails db:prepare"
    if-candidate: true

  - cmd: "bin/rails server -b 0.0.0.0 -p 8081"

lease:
  type: "consul"
  advertise-url: "http://${HOSTNAME}.vm.${FLY_APP_NAME}.internal:20202"
  candidate: ${FLY_REGION == PRIMARY_REGION}
  promote: true

  consul:
    url: "${FLY_CONSUL_URL}"
    key: "litefs/${FLY_APP_NAME}"
"#;

/// The environment a Fly.io machine in the primary region would have.
fn fly_env(name: &str) -> Option<String> {
    let value = match name {
        "HOSTNAME" => "148e21ea7d5589",
        "FLY_MACHINE_ID" => "148e21ea7d5589",
        "FLY_APP_NAME" => "my-app",
        "FLY_REGION" => "ams",
        "PRIMARY_REGION" => "ams",
        "FLY_CONSUL_URL" => "https://:s3cr3t@consul-fra-5.fly-shared.net/my-app-xyz123/",
        _ => return None,
    };
    Some(value.to_owned())
}

/// The same machine, but in a replica region.
fn fly_replica_env(name: &str) -> Option<String> {
    match name {
        "FLY_REGION" => Some("ord".to_owned()),
        other => fly_env(other),
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|word| (*word).to_owned()).collect()
}

fn parse_without_env(text: &str) -> Result<Config, ConfigError> {
    parse_with_env(text, Some(&no_env))
}

fn parse_err(text: &str) -> ConfigError {
    match parse_without_env(text) {
        Ok(config) => panic!("expected an error for:\n{text}\ngot {config:#?}"),
        Err(error) => error,
    }
}

/// Asserts that `error` names `key` and `line`, in its fields and message.
fn assert_names(error: &ConfigError, key: &str, line: usize) {
    let message = error.to_string();
    assert_eq!(error.key(), Some(key), "{message}");
    assert_eq!(error.line(), Some(line), "{message}");
    assert!(message.contains(key), "message lacks `{key}`: {message}");
    assert!(
        message.contains(&format!("line {line}")),
        "message lacks `line {line}`: {message}"
    );
}

#[test]
fn the_fly_io_deployment_config_parses() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/fly/ltxfs.yml"))
            .unwrap();
    let primary = parse_with_env(&text, Some(&fly_env)).unwrap();
    assert_eq!(primary.lease.lease_type, LeaseType::Consul);
    assert!(primary.lease.candidate);
    assert_eq!(primary.lease.hostname.as_deref(), Some("148e21ea7d5589"));
    assert_eq!(primary.proxy.addr.as_deref(), Some(":8080"));
    assert_eq!(primary.proxy.mode_in(Some("my-app")), ProxyMode::Replay);
    assert!(primary.exec[0].if_candidate && !primary.exec[1].if_candidate);
    let replica = parse_with_env(&text, Some(&fly_replica_env)).unwrap();
    assert!(!replica.lease.candidate);
}

#[test]
fn fly_io_consul_litefs_yml_parses_unchanged() {
    let config = parse_with_env(FLY_CONSUL_LITEFS_YML, Some(&fly_env)).unwrap();

    assert_eq!(config.fuse.dir.as_deref(), Some(Path::new("/litefs")));
    assert_eq!(
        config.data.dir.as_deref(),
        Some(Path::new("/var/lib/litefs"))
    );
    assert!(!config.exit_on_error);
    assert_eq!(config.proxy.addr.as_deref(), Some(":8080"));
    assert_eq!(config.proxy.target.as_deref(), Some("localhost:8081"));
    assert_eq!(config.proxy.db, vec!["db"]);
    assert_eq!(config.proxy.passthrough, vec!["*.ico", "*.png"]);
    assert!(config.proxy.is_enabled());
    assert_eq!(
        config.exec,
        vec![
            ExecCommand {
                argv: argv(&["bin/rails", "db:prepare"]),
                if_candidate: true,
            },
            ExecCommand {
                argv: argv(&["bin/rails", "server", "-b", "0.0.0.0", "-p", "8081"]),
                if_candidate: false,
            },
        ]
    );
    assert_eq!(config.lease.lease_type, LeaseType::Consul);
    assert_eq!(
        config.lease.advertise_url.as_deref(),
        Some("http://148e21ea7d5589.vm.my-app.internal:20202")
    );
    assert!(config.lease.candidate);
    assert!(config.lease.promote);
    assert_eq!(
        config.lease.consul.url.as_deref(),
        Some("https://:s3cr3t@consul-fra-5.fly-shared.net/my-app-xyz123/")
    );
    assert_eq!(config.lease.consul.key.as_deref(), Some("litefs/my-app"));
    // Unwritten keys keep LiteFS's defaults.
    assert_eq!(config.lease.consul.ttl, Duration::from_secs(10));
    assert_eq!(config.lease.consul.lock_delay, Duration::from_secs(1));
    assert_eq!(config.http.addr, ":20202");

    let replica = parse_with_env(FLY_CONSUL_LITEFS_YML, Some(&fly_replica_env)).unwrap();
    assert!(!replica.lease.candidate);
}

#[test]
fn fly_io_file_without_its_environment_points_at_the_unset_variable() {
    let error = parse_without_env(FLY_CONSUL_LITEFS_YML).unwrap_err();
    let message = error.to_string();
    // Every variable expands to an empty string, so the Consul URL is empty,
    // and the note names the variable to set.
    assert_names(&error, "lease.consul.url", 37);
    assert!(message.contains("`FLY_CONSUL_URL`"), "{message}");
    assert!(message.contains("not set"), "{message}");
}

/// Every supported key, each with a value other than its default.
const EVERY_KEY: &str = r#"exit-on-error: false
skip-sync: true
strict-verify: true

exec: "myapp -addr :8081"

fuse:
  dir: /mnt/ltxfs
  allow-other: true
  debug: true

data:
  dir: /var/lib/ltxfs
  compress: false
  retention: 1h30m
  retention-monitor-interval: 30s
  max-size: 512MiB

lease:
  type: etcd
  hostname: node-1
  advertise-url: http://node-1:20202
  candidate: false
  promote: true
  reconnect-delay: 2s
  demote-delay: 1m
  consul:
    url: http://consul:8500
    key: ltxfs/primary
    ttl: 15s
    lock-delay: 250ms
  etcd:
    endpoints: ["http://etcd-1:2379", "http://etcd-2:2379"]
    key: ltxfs/primary
    ttl: 20s

http:
  addr: ":20203"

proxy:
  addr: ":8080"
  target: localhost:8081
  db: [app.db, cache.db]
  debug: true
  passthrough: ["/debug/*", "*.png"]
  always-forward: ["/admin/*"]
  max-lag: 3s
  primary-redirect-timeout: 2s
  mode: forward

log:
  format: json
  debug: true
  timestamp: true
"#;

#[test]
fn every_key_parses() {
    let config = parse_without_env(EVERY_KEY).unwrap();

    assert!(!config.exit_on_error);
    assert!(config.skip_sync);
    assert!(config.strict_verify);
    assert_eq!(
        config.exec,
        vec![ExecCommand {
            argv: argv(&["myapp", "-addr", ":8081"]),
            if_candidate: false,
        }]
    );

    assert_eq!(config.fuse.dir, Some(PathBuf::from("/mnt/ltxfs")));
    assert!(config.fuse.allow_other);
    assert!(config.fuse.debug);

    assert_eq!(config.data.dir, Some(PathBuf::from("/var/lib/ltxfs")));
    assert!(!config.data.compress);
    assert_eq!(config.data.retention, Duration::from_secs(5400));
    assert_eq!(
        config.data.retention_monitor_interval,
        Duration::from_secs(30)
    );
    assert_eq!(config.data.max_size, Some(512 * 1024 * 1024));

    let lease = &config.lease;
    assert_eq!(lease.lease_type, LeaseType::Etcd);
    assert_eq!(lease.hostname.as_deref(), Some("node-1"));
    assert_eq!(lease.advertise_url.as_deref(), Some("http://node-1:20202"));
    assert!(!lease.candidate);
    assert!(lease.promote);
    assert_eq!(lease.reconnect_delay, Duration::from_secs(2));
    assert_eq!(lease.demote_delay, Duration::from_secs(60));
    assert_eq!(lease.consul.url.as_deref(), Some("http://consul:8500"));
    assert_eq!(lease.consul.key.as_deref(), Some("ltxfs/primary"));
    assert_eq!(lease.consul.ttl, Duration::from_secs(15));
    assert_eq!(lease.consul.lock_delay, Duration::from_millis(250));
    assert_eq!(
        lease.etcd.endpoints,
        vec!["http://etcd-1:2379", "http://etcd-2:2379"]
    );
    assert_eq!(lease.etcd.key.as_deref(), Some("ltxfs/primary"));
    assert_eq!(lease.etcd.ttl, Duration::from_secs(20));

    assert_eq!(config.http.addr, ":20203");

    let proxy = &config.proxy;
    assert_eq!(proxy.addr.as_deref(), Some(":8080"));
    assert_eq!(proxy.target.as_deref(), Some("localhost:8081"));
    assert_eq!(proxy.db, vec!["app.db", "cache.db"]);
    assert!(proxy.debug);
    assert_eq!(proxy.passthrough, vec!["/debug/*", "*.png"]);
    assert_eq!(proxy.always_forward, vec!["/admin/*"]);
    assert_eq!(proxy.max_lag, Some(Duration::from_secs(3)));
    assert_eq!(proxy.primary_redirect_timeout, Duration::from_secs(2));
    assert_eq!(proxy.mode, Some(ProxyMode::Forward));
    assert_eq!(proxy.mode_in(Some("my-app")), ProxyMode::Forward);

    assert_eq!(config.log.format, LogFormat::Json);
    assert!(config.log.debug);
    assert!(config.log.timestamp);
}

#[test]
fn defaults_are_a_single_node_primary_with_litefs_defaults() {
    let config = Config::default();
    assert_eq!(parse_without_env("").unwrap(), config);
    assert_eq!(parse_without_env("# only a comment\n").unwrap(), config);
    // Empty sections and empty values mean the defaults too.
    let empty_sections =
        "fuse:\ndata:\nlease:\n  consul:\nhttp:\n  addr:\nreplication:\nproxy:\nlog:\nexec:\n";
    assert_eq!(parse_without_env(empty_sections).unwrap(), config);
    assert!(config.validate().is_ok());

    assert!(config.exit_on_error);
    assert!(!config.skip_sync);
    assert!(!config.strict_verify);
    assert!(config.exec.is_empty());
    assert_eq!(config.fuse.dir, None);
    assert!(!config.fuse.allow_other);
    assert!(!config.fuse.debug);
    assert_eq!(config.data.dir, None);
    assert!(config.data.compress);
    assert_eq!(config.data.retention, Duration::from_secs(600));
    assert_eq!(
        config.data.retention_monitor_interval,
        Duration::from_secs(60)
    );
    assert_eq!(config.data.max_size, None);
    assert_eq!(config.lease.lease_type, LeaseType::Static);
    assert!(config.lease.candidate);
    assert!(!config.lease.promote);
    assert_eq!(config.lease.hostname, None);
    assert_eq!(config.lease.advertise_url, None);
    assert_eq!(config.lease.reconnect_delay, Duration::from_secs(1));
    assert_eq!(config.lease.demote_delay, Duration::from_secs(10));
    assert_eq!(config.lease.consul.ttl, Duration::from_secs(10));
    assert_eq!(config.lease.consul.lock_delay, Duration::from_secs(1));
    assert_eq!(config.lease.etcd.ttl, Duration::from_secs(10));
    // A node that names no other node listens only on loopback, on a free port.
    assert_eq!(config.http.addr, "127.0.0.1:0");
    assert!(config.http.secrets.is_empty());
    assert_eq!(config.http.tls, None);
    assert!(!config.http.metrics_secret);
    assert!(!config.replication.synchronous);
    assert!(!config.proxy.is_enabled());
    assert_eq!(config.proxy.max_lag, None);
    assert_eq!(
        config.proxy.primary_redirect_timeout,
        Duration::from_secs(5)
    );
    assert_eq!(config.proxy.mode, None);
    assert_eq!(config.proxy.mode_in(Some("my-app")), ProxyMode::Replay);
    assert_eq!(config.proxy.mode_in(None), ProxyMode::Forward);
    assert_eq!(config.log.format, LogFormat::Text);
    assert!(!config.log.debug);
    assert!(!config.log.timestamp);
}

#[test]
fn unknown_keys_name_the_key_and_line() {
    let top = parse_err("fuse:\n  dir: /litefs\nbogus: 1\n");
    assert_names(&top, "bogus", 3);

    let nested =
        parse_err("lease:\n  type: static\n  consul:\n    url: http://x:8500\n    keyy: k\n");
    assert_names(&nested, "lease.consul.keyy", 5);
    assert!(
        nested.to_string().contains("did you mean `key`?"),
        "{nested}"
    );

    let in_exec = parse_err("exec:\n  - cmd: a\n  - cmd: b\n    if_candidate: true\n");
    assert_names(&in_exec, "exec[1].if_candidate", 4);
    assert!(in_exec.to_string().contains("`if-candidate`"), "{in_exec}");

    let flow = parse_err("proxy: {addr: ':8080', targett: 'x:1'}\n");
    assert_names(&flow, "proxy.targett", 1);

    let replication = parse_err("replication:\n  sync: true\n");
    assert_names(&replication, "replication.sync", 2);
    assert!(
        parse_without_env("replication:\n  synchronous: true\n")
            .unwrap()
            .replication
            .synchronous
    );
}

#[test]
fn type_errors_name_the_key_and_line() {
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "fuse:\n  allow-other: maybe\n",
            "fuse.allow-other",
            2,
            "`maybe`",
        ),
        (
            "lease:\n  candidate: 3\n",
            "lease.candidate",
            2,
            "true or false",
        ),
        ("lease:\n  type: zookeeper\n", "lease.type", 2, "`consul`"),
        ("log:\n  format: xml\n", "log.format", 2, "`json`"),
        ("proxy:\n  mode: bounce\n", "proxy.mode", 2, "`replay`"),
        ("data:\n  max-size: 1G\n", "data.max-size", 2, "`1GiB`"),
        ("data:\n  max-size: -5\n", "data.max-size", 2, "negative"),
        (
            "proxy:\n  db: {a: 1}\n",
            "proxy.db",
            2,
            "a string or a list of strings",
        ),
        ("lease: [a]\n", "lease", 1, "a mapping of keys"),
    ];
    for (text, key, line, fragment) in cases {
        let error = parse_err(text);
        assert_names(&error, key, *line);
        assert!(error.to_string().contains(fragment), "{error}");
    }
}

#[test]
fn yaml_syntax_errors_have_lines() {
    let error = parse_err("fuse:\n  dir: /x\n  debug: [true\n");
    assert!(error.line().is_some(), "{error}");
    assert!(matches!(error, ConfigError::Parse { .. }), "{error}");
}

#[test]
fn litefs_keys_that_ltxfs_does_not_support_say_so() {
    let cases: &[(&str, &str, usize)] = &[
        (
            "fuse:\n  dir: /litefs\nbackup:\n  type: litefs-cloud\n  auth-token: x\n",
            "backup.type",
            4,
        ),
        (
            "tracing:\n  path: /var/log/litefs/trace.log\n  max-size: 64\n",
            "tracing",
            1,
        ),
        ("tracing:\n", "tracing", 1),
        (
            "proxy:\n  addr: ':8080'\n  read-timeout: 5s\n",
            "proxy.read-timeout",
            3,
        ),
        (
            "http:\n  snapshot-timeout: 1m\n",
            "http.snapshot-timeout",
            2,
        ),
        ("lease:\n  databases:\n    - app.db\n", "lease.databases", 2),
    ];
    for (text, key, line) in cases {
        let error = parse_err(text);
        assert!(
            matches!(error, ConfigError::UnsupportedLiteFsKey { .. }),
            "{error:?}"
        );
        assert_names(&error, key, *line);
        let message = error.to_string();
        assert!(message.contains("LiteFS setting"), "{message}");
        assert!(message.contains("does not support yet"), "{message}");
        assert!(message.contains("remove it"), "{message}");
    }
    let tracing = parse_err("tracing:\n  enabled: true\n").to_string();
    assert!(tracing.contains("log.debug"), "{tracing}");
}

#[test]
fn environment_expansion_can_be_turned_off() {
    let text = "lease:\n  hostname: \"${NODE_NAME}\"\n  advertise-url: http://$NODE_NAME:20202\n";
    let env = |name: &str| (name == "NODE_NAME").then(|| "node-7".to_owned());

    let expanded = parse_with_env(text, Some(&env)).unwrap();
    assert_eq!(expanded.lease.hostname.as_deref(), Some("node-7"));
    assert_eq!(
        expanded.lease.advertise_url.as_deref(),
        Some("http://node-7:20202")
    );

    let literal = parse(text, false).unwrap();
    assert_eq!(literal.lease.hostname.as_deref(), Some("${NODE_NAME}"));
    assert_eq!(
        literal.lease.advertise_url.as_deref(),
        Some("http://$NODE_NAME:20202")
    );
}

#[test]
fn environment_expansion_reads_the_process_environment() {
    // Cargo sets CARGO_PKG_NAME for test processes; compare against whatever
    // the process really has, so the test holds either way.
    let expected = std::env::var("CARGO_PKG_NAME")
        .ok()
        .filter(|value| !value.is_empty());
    let config = parse("lease:\n  hostname: \"${CARGO_PKG_NAME}\"\n", true).unwrap();
    assert_eq!(config.lease.hostname, expected);
}

#[test]
fn environment_expansion_rules() {
    let env = |name: &str| match name {
        "REGION" => Some("ams".to_owned()),
        "PRIMARY" => Some("ord".to_owned()),
        _ => None,
    };
    let text = "lease:\n  \
                hostname: \"${UNSET}\"\n  \
                advertise-url: http://primary:20202\n  \
                candidate: ${REGION == PRIMARY}\n  \
                promote: ${REGION == 'ams'}\n\
                exec: \"sh -c 'echo $$HOME'\"\n";
    let config = parse_with_env(text, Some(&env)).unwrap();
    // Unset expands to empty, and an empty string means "not set".
    assert_eq!(config.lease.hostname, None);
    assert!(!config.lease.candidate);
    assert!(config.lease.promote);
    // `$$` is a literal `$`.
    assert_eq!(config.exec[0].argv, argv(&["sh", "-c", "echo $HOME"]));

    let unterminated = parse_err("fuse:\n  dir: /x\nlease:\n  hostname: ${HOST\n");
    assert_eq!(unterminated.line(), Some(4), "{unterminated}");
    let shell_default = parse_err("http:\n  addr: \":${PORT:-20202}\"\n");
    assert_eq!(shell_default.line(), Some(2), "{shell_default}");
    assert!(
        shell_default.to_string().contains("${PORT:-20202}"),
        "{shell_default}"
    );
}

#[test]
fn lines_refer_to_the_file_as_written_even_when_values_span_lines() {
    let env = |name: &str| (name == "MULTI").then(|| "line one\nline two".to_owned());
    let text = "lease:\n  hostname: \"$MULTI\"\n  bogus: 1\n";
    let error = parse_with_env(text, Some(&env)).unwrap_err();
    assert_names(&error, "lease.bogus", 3);
}

#[test]
fn durations_use_go_syntax() {
    let table: &[(&str, Duration)] = &[
        ("10s", Duration::from_secs(10)),
        ("5m", Duration::from_secs(300)),
        ("1h30m", Duration::from_secs(5400)),
        ("250ms", Duration::from_millis(250)),
        ("1m30s", Duration::from_secs(90)),
        ("1.5h", Duration::from_secs(5400)),
        ("\"0\"", Duration::ZERO),
        ("0", Duration::ZERO),
        ("'2h45m30.5s'", Duration::from_millis(9_930_500)),
        ("100us", Duration::from_micros(100)),
        ("42ns", Duration::from_nanos(42)),
    ];
    for (written, expected) in table {
        let text = format!("data:\n  retention: {written}\n");
        let config = parse_without_env(&text).unwrap_or_else(|error| panic!("{written}: {error}"));
        assert_eq!(config.data.retention, *expected, "{written}");
    }
}

#[test]
fn bad_durations_name_the_key_and_the_value() {
    for written in ["10", "1d", "ten", "-5s", "10 s", "\"\"", "1.5", "true"] {
        let text = format!("lease:\n  consul:\n    lock-delay: {written}\n");
        let error = parse_err(&text);
        assert_names(&error, "lease.consul.lock-delay", 3);
        let shown = written.trim_matches('"');
        assert!(error.to_string().contains(shown), "{written}: {error}");
    }
}

#[test]
fn exec_forms() {
    let single = parse_without_env("exec: \"myapp --name 'my app' -v\"\n").unwrap();
    assert_eq!(
        single.exec,
        vec![ExecCommand {
            argv: argv(&["myapp", "--name", "my app", "-v"]),
            if_candidate: false,
        }]
    );

    let list = parse_without_env(
        "exec:\n  - cmd: \"migrate up\"\n    if-candidate: true\n  - cmd: \"seed\"\n    if-candidate: false\n  - \"serve --port 8081\"\n",
    )
    .unwrap();
    assert_eq!(
        list.exec,
        vec![
            ExecCommand {
                argv: argv(&["migrate", "up"]),
                if_candidate: true,
            },
            ExecCommand {
                argv: argv(&["seed"]),
                if_candidate: false,
            },
            ExecCommand {
                argv: argv(&["serve", "--port", "8081"]),
                if_candidate: false,
            },
        ]
    );

    // An empty command line (such as an unset variable) means no command.
    assert!(
        parse_without_env("exec: \"${APP}\"\n")
            .unwrap()
            .exec
            .is_empty()
    );

    let quoting = parse_err("fuse:\n  dir: /x\nexec: \"myapp 'unclosed\"\n");
    assert_names(&quoting, "exec", 3);

    let shell = parse_err("exec:\n  - cmd: \"migrate && serve\"\n");
    assert_names(&shell, "exec[0].cmd", 2);
    assert!(shell.to_string().contains("sh -c"), "{shell}");

    let missing_cmd = parse_err("exec:\n  - cmd: a\n  - if-candidate: true\n");
    assert_names(&missing_cmd, "exec[1]", 3);
    assert!(matches!(missing_cmd, ConfigError::Invalid { .. }));

    let wrong_type = parse_err("exec: 42\n");
    assert_names(&wrong_type, "exec", 1);
}

#[test]
fn exec_from_command_line_arguments() {
    let command = ExecCommand::from_argv(&["myapp", "-addr", ":8081", "two words"]).unwrap();
    assert_eq!(
        command.argv,
        argv(&["myapp", "-addr", ":8081", "two words"])
    );
    assert!(!command.if_candidate);

    let empty: [&str; 0] = [];
    let error = ExecCommand::from_argv(&empty).unwrap_err();
    assert_eq!(error.key(), Some("exec"));
    assert!(error.to_string().contains("--"), "{error}");
    assert!(ExecCommand::from_argv(&[""]).is_err());
}

#[test]
fn proxy_db_is_a_string_or_a_list() {
    let base = "proxy:\n  addr: ':8080'\n  target: localhost:8081\n";
    let one = parse_without_env(&format!("{base}  db: app.db\n")).unwrap();
    assert_eq!(one.proxy.db, vec!["app.db"]);
    let many = parse_without_env(&format!("{base}  db:\n    - a.db\n    - b.db\n")).unwrap();
    assert_eq!(many.proxy.db, vec!["a.db", "b.db"]);
}

#[test]
fn booleans_accept_the_yaml_1_1_words_litefs_accepts() {
    for (written, expected) in [
        ("yes", true),
        ("on", true),
        ("True", true),
        ("Y", true),
        ("no", false),
        ("OFF", false),
        ("false", false),
        ("\"true\"", true),
    ] {
        let config = parse_without_env(&format!("fuse:\n  debug: {written}\n")).unwrap();
        assert_eq!(config.fuse.debug, expected, "{written}");
    }
}

#[test]
fn max_lag_zero_means_no_bound() {
    let text = "proxy:\n  addr: ':8080'\n  target: localhost:8081\n  db: db\n  max-lag: 0s\n";
    assert_eq!(parse_without_env(text).unwrap().proxy.max_lag, None);
}

#[test]
fn validation_errors_name_the_key_line_and_remedy() {
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "lease:\n  type: consul\n  consul:\n    key: k\n",
            "lease.consul.url",
            3,
            "FLY_CONSUL_URL",
        ),
        (
            "lease:\n  type: consul\n  consul:\n    url: http://consul:8500\n",
            "lease.consul.key",
            3,
            "required",
        ),
        (
            "lease:\n  type: consul\n",
            "lease.consul.url",
            1,
            "required",
        ),
        (
            "lease:\n  type: consul\n  consul:\n    url: consul:8500\n    key: k\n",
            "lease.consul.url",
            4,
            "http://",
        ),
        (
            "lease:\n  type: consul\n  consul:\n    url: http://c:8500\n    key: k\n    ttl: 5s\n",
            "lease.consul.ttl",
            6,
            "`10s`",
        ),
        (
            "lease:\n  type: etcd\n  etcd:\n    key: k\n",
            "lease.etcd.endpoints",
            3,
            "required",
        ),
        (
            "lease:\n  type: etcd\n  etcd:\n    endpoints: http://e:2379\n",
            "lease.etcd.key",
            3,
            "required",
        ),
        (
            "lease:\n  type: etcd\n  etcd:\n    endpoints: http://e:2379\n    key: k\n    ttl: 1500ms\n",
            "lease.etcd.ttl",
            6,
            "whole number of seconds",
        ),
        (
            "lease:\n  candidate: false\n",
            "lease.advertise-url",
            1,
            "primary's URL",
        ),
        (
            "lease:\n  advertise-url: node-1:20202\n",
            "lease.advertise-url",
            2,
            "http://",
        ),
        (
            "proxy:\n  addr: ':8080'\n",
            "proxy.target",
            1,
            "localhost:8081",
        ),
        (
            "proxy:\n  target: localhost:8081\n  db: db\n",
            "proxy.addr",
            1,
            "listens",
        ),
        (
            "proxy:\n  addr: ':8080'\n  target: localhost:8081\n",
            "proxy.db",
            1,
            "required",
        ),
        (
            "proxy:\n  addr: ':8080'\n  target: http://localhost:8081\n  db: db\n",
            "proxy.target",
            3,
            "without a scheme",
        ),
        (
            "proxy:\n  addr: '8080'\n  target: localhost:8081\n  db: db\n",
            "proxy.addr",
            2,
            "`:8080`",
        ),
        (
            "proxy:\n  addr: ':8080'\n  target: localhost:8080\n  db: db\n",
            "proxy.target",
            3,
            "itself",
        ),
        (
            "proxy:\n  addr: ':20202'\n  target: localhost:8081\n  db: db\nlease:\n  type: static\n  candidate: false\n  advertise-url: http://primary:20202\n",
            "proxy.addr",
            2,
            "same port",
        ),
        (
            "proxy:\n  addr: ':8080'\n  target: localhost:8081\n  db: [a.db, sub/b.db]\n",
            "proxy.db[1]",
            4,
            "without `/`",
        ),
        (
            "proxy:\n  addr: ':8080'\n  target: localhost:8081\n  db: db\n  primary-redirect-timeout: 0s\n",
            "proxy.primary-redirect-timeout",
            5,
            "longer than zero",
        ),
        ("http:\n  addr: localhost\n", "http.addr", 2, "[host]:port"),
        (
            "fuse:\n  dir: /litefs\ndata:\n  dir: /litefs/\n",
            "data.dir",
            4,
            "different directory",
        ),
        (
            "fuse:\n  dir: /litefs\ndata:\n  dir: /litefs/.data\n",
            "data.dir",
            4,
            "outside the mount",
        ),
        (
            "data:\n  retention-monitor-interval: 0s\n",
            "data.retention-monitor-interval",
            2,
            "longer than zero",
        ),
        (
            "data:\n  max-size: 0\n",
            "data.max-size",
            2,
            "larger than zero",
        ),
    ];
    for (text, key, line, fragment) in cases {
        let error = parse_err(text);
        assert!(matches!(error, ConfigError::Invalid { .. }), "{error:?}");
        assert_names(&error, key, *line);
        assert!(error.to_string().contains(fragment), "{text}\n{error}");
    }
}

#[test]
fn validate_can_be_rerun_after_command_line_overrides() {
    let mut config = Config::default();
    config.fuse.dir = Some(PathBuf::from("/mnt"));
    config.data.dir = Some(PathBuf::from("/mnt/data"));
    let error = config.validate().unwrap_err();
    assert_eq!(error.key(), Some("data.dir"));
    assert_eq!(error.line(), None);
}

/// Writes `text` to `dir/name`, creating `dir`.
fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn search_order_is_explicit_then_each_candidate_then_defaults() {
    let temp = tempfile::tempdir().unwrap();
    let working_dir = temp.path().join("cwd");
    let etc = temp.path().join("etc");
    let local = write_file(&working_dir, "ltxfs.yml", "http:\n  addr: ':1111'\n");
    let system = write_file(&etc, "ltxfs.yml", "http:\n  addr: ':2222'\n");
    let explicit = write_file(temp.path(), "custom.yml", "http:\n  addr: ':3333'\n");
    let candidates = vec![local.clone(), system.clone()];

    let loaded = config::load_from(Some(&explicit), &candidates, true).unwrap();
    assert_eq!(loaded.config.http.addr, ":3333");
    assert_eq!(loaded.path.as_deref(), Some(explicit.as_path()));

    let loaded = config::load_from(None, &candidates, true).unwrap();
    assert_eq!(loaded.config.http.addr, ":1111");
    assert_eq!(loaded.path.as_deref(), Some(local.as_path()));

    fs::remove_file(&local).unwrap();
    let loaded = config::load_from(None, &candidates, true).unwrap();
    assert_eq!(loaded.config.http.addr, ":2222");
    assert_eq!(loaded.path.as_deref(), Some(system.as_path()));

    fs::remove_file(&system).unwrap();
    // A leftover litefs.yml only causes a warning; the defaults still apply.
    write_file(&working_dir, "litefs.yml", "bogus: true\n");
    let loaded = config::load_from(None, &candidates, true).unwrap();
    assert_eq!(loaded.config, Config::default());
    assert_eq!(loaded.path, None);
}

#[test]
fn relative_candidates_are_reported_as_absolute_paths() {
    let loaded = config::load_from(None, &[PathBuf::from("no-such-dir/ltxfs.yml")], false).unwrap();
    assert_eq!(loaded.path, None);

    // The package directory has no ltxfs.yml, but Cargo.toml is a readable
    // relative path; the path reported must be absolute.
    let error = config::load_from(None, &[PathBuf::from("Cargo.toml")], false).unwrap_err();
    let file = error.file().expect("error names the file");
    assert!(file.is_absolute(), "{}", file.display());
}

#[test]
fn an_explicit_path_that_does_not_exist_is_an_error() {
    let temp = tempfile::tempdir().unwrap();
    let missing = temp.path().join("nope.yml");
    let present = write_file(temp.path(), "ltxfs.yml", "");
    let error = config::load_from(Some(&missing), &[present], true).unwrap_err();
    assert!(matches!(error, ConfigError::NotFound { .. }), "{error:?}");
    assert!(error.to_string().contains("nope.yml"), "{error}");
}

#[test]
fn unreadable_candidates_are_errors_not_skipped() {
    let temp = tempfile::tempdir().unwrap();
    // A directory where the file should be cannot be read as text.
    let directory = temp.path().join("ltxfs.yml");
    fs::create_dir(&directory).unwrap();
    let error = config::load_from(None, std::slice::from_ref(&directory), true).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
    assert_eq!(error.file(), Some(directory.as_path()));
}

#[test]
fn errors_from_files_name_the_file_key_and_line() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_file(
        temp.path(),
        "ltxfs.yml",
        "fuse:\n  dir: /litefs\nlease:\n  type: consul\n",
    );
    let error = config::load_from(Some(&path), &[], true).unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("{}: line 3: ", path.display())),
        "{message}"
    );
    assert_names(&error, "lease.consul.url", 3);
    assert_eq!(error.file(), Some(path.as_path()));

    let bad_yaml = write_file(temp.path(), "bad.yml", "fuse:\n  dir: [\n");
    let error = config::load_from(Some(&bad_yaml), &[], true).unwrap_err();
    assert_eq!(error.file(), Some(bad_yaml.as_path()));
    assert!(error.line().is_some(), "{error}");
}

#[test]
fn the_litefs_example_config_from_the_litefs_repository_shape_is_reported_clearly() {
    // LiteFS's annotated example enables `tracing`; everything else in it is
    // supported, so the only complaint is about `tracing`.
    let text = r#"fuse:
  dir: "/litefs"
  allow-other: false
  debug: false
data:
  dir: "/var/lib/litefs"
  retention: "10m"
  retention-monitor-interval: "1m"
exec: "myapp -addr :8081"
skip-sync: false
exit-on-error: false
http:
  addr: ":20202"
proxy:
  addr: ":8080"
  target: "localhost:8081"
  db: "my.db"
  debug: false
  passthrough: ["/debug/*", "*.png"]
lease:
  type: "consul"
  advertise-url: "http://myhost:20202"
  hostname: "myhost"
  candidate: true
  consul:
    url: "http://myhost:8500"
    key: "litefs/primary"
    ttl: "10s"
    lock-delay: "1s"
tracing:
  path: "/var/log/lifefs/trace.log"
  max-size: 64
  max-count: 10
  compress: true
"#;
    let error = parse_err(text);
    assert!(matches!(error, ConfigError::UnsupportedLiteFsKey { .. }));
    assert_names(&error, "tracing", 30);

    let without_tracing = text.split("tracing:").next().unwrap();
    let config = parse_without_env(without_tracing).unwrap();
    assert_eq!(config.lease.lease_type, LeaseType::Consul);
    assert_eq!(config.proxy.db, vec!["my.db"]);
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn on_arbitrary_text(text in "\\PC{0,200}") {
            let _ = parse_with_env(&text, Some(&no_env));
            let _ = parse(&text, false);
        }

        #[test]
        fn on_yaml_like_text(text in "([a-z\\-]{1,12}: ?[\\[\\]{}'\"$#:a-z0-9 ]{0,12}\n {0,4}){0,12}") {
            let _ = parse_with_env(&text, Some(&no_env));
        }

        #[test]
        fn on_damaged_real_files(cut in 0usize..2000, insert in "\\PC{0,3}") {
            for original in [FLY_CONSUL_LITEFS_YML, EVERY_KEY] {
                let mut position = cut.min(original.len());
                while !original.is_char_boundary(position) {
                    position -= 1;
                }
                let damaged = format!("{}{}{}", &original[..position], insert, &original[position..]);
                let _ = parse_with_env(&damaged, Some(&fly_env));
            }
        }
    }
}

#[test]
fn a_litefs_yml_without_ltxfs_yml_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let candidates = vec![dir.path().join("ltxfs.yml")];
    std::fs::write(dir.path().join("litefs.yml"), "fuse:\n  dir: /litefs\n").unwrap();
    let loaded = config::load_from(None, &candidates, true).unwrap();
    assert!(
        loaded.path.is_none(),
        "litefs.yml is not read under its old name"
    );
    assert_eq!(loaded.warnings.len(), 1);
    assert!(
        loaded.warnings[0].contains("litefs.yml") && loaded.warnings[0].contains("rename"),
        "{:?}",
        loaded.warnings
    );
    std::fs::write(&candidates[0], "fuse:\n  dir: /ltxfs\n").unwrap();
    assert!(
        config::load_from(None, &candidates, true)
            .unwrap()
            .warnings
            .is_empty()
    );
}

#[test]
fn the_backup_section_has_defaults_and_names_what_is_wrong() {
    let config = parse_without_env(
        "backup:\n  destinations:\n    - url: s3://bucket/prod\n      endpoint: https://fly.storage.tigris.dev\n      region: auto\n      secret-access-key: hunter2\n",
    )
    .unwrap();
    let backup = &config.backup;
    assert_eq!(backup.destinations.len(), 1);
    assert_eq!(backup.destinations[0].url, "s3://bucket/prod");
    assert_eq!(backup.sync_interval, Duration::from_secs(1));
    assert_eq!(backup.snapshot_interval, Duration::from_secs(24 * 3600));
    assert_eq!(backup.retention, Duration::from_secs(72 * 3600));
    assert_eq!(backup.compaction_windows.len(), 3);
    assert!(!backup.restore_on_boot);
    assert!(
        !format!("{config:?}").contains("hunter2"),
        "a secret is shown by Debug"
    );

    let cases: &[(&str, &str, &str)] = &[
        (
            "backup:\n  destinations:\n    - url: ftp://host/x\n",
            "backup.destinations[0].url",
            "unknown scheme",
        ),
        (
            "backup:\n  destinations:\n    - url: s3:///prefix\n",
            "backup.destinations[0].url",
            "names no bucket",
        ),
        (
            "backup:\n  destinations:\n    - url: file://relative/path\n",
            "backup.destinations[0].url",
            "absolute path",
        ),
        (
            "backup:\n  destinations:\n    - url: s3://b\n  compaction-windows: [5m, 30s]\n",
            "backup.compaction-windows",
            "longer than the one before",
        ),
        (
            "backup:\n  destinations:\n    - url: s3://b\n  encryption:\n    age-recipients: [\"ssh-ed25519 AAAA\"]\n",
            "backup.encryption.age-recipients[0]",
            "age-keygen",
        ),
        (
            "backup:\n  restore-on-boot: true\n",
            "backup.restore-on-boot",
            "backup.destinations",
        ),
        (
            "backup:\n  sync-interval: 0\n",
            "backup.sync-interval",
            "longer than zero",
        ),
    ];
    for (text, key, fragment) in cases {
        let error = parse_err(text);
        assert_eq!(error.key(), Some(*key), "{error}");
        assert!(error.to_string().contains(fragment), "{error}");
    }
}

#[test]
fn http_defaults_to_every_interface_only_when_the_config_names_other_nodes() {
    let multi_node = [
        "lease:\n  type: etcd\n  etcd:\n    endpoints: http://e:2379\n    key: k\n",
        "lease:\n  type: static\n  advertise-url: http://primary:20202\n",
        "lease:\n  type: static\n  candidate: false\n  advertise-url: http://primary:20202\n",
    ];
    for text in multi_node {
        assert_eq!(
            parse_without_env(text).unwrap().http.addr,
            ":20202",
            "{text}"
        );
    }
    let explicit = parse_without_env("http:\n  addr: 127.0.0.1:9000\n").unwrap();
    assert_eq!(explicit.http.addr, "127.0.0.1:9000");
}

#[test]
fn the_cluster_secret_tls_and_metrics_settings_are_read_and_checked() {
    let config = parse_without_env(
        "http:\n  secret: 0123456789abcdef0123\n  metrics-secret: true\n  tls:\n    cert: /c.pem\n    key: /k.pem\n    ca: /ca.pem\n",
    )
    .unwrap();
    assert_eq!(config.http.secrets.len(), 1);
    assert_eq!(config.http.secrets[0].expose(), "0123456789abcdef0123");
    assert!(
        !format!("{config:?}").contains("0123456789abcdef0123"),
        "secrets stay out of logs"
    );
    assert!(config.http.metrics_secret);
    let tls = config.http.tls.unwrap();
    assert_eq!(tls.cert, Path::new("/c.pem"));
    assert_eq!(tls.ca.as_deref(), Some(Path::new("/ca.pem")));
    let rotating =
        parse_without_env("http:\n  secrets: [new-secret-0123456789, old-secret-0123456789]\n")
            .unwrap();
    let secrets: Vec<&str> = rotating.http.secrets.iter().map(|s| s.expose()).collect();
    assert_eq!(secrets, ["new-secret-0123456789", "old-secret-0123456789"]);

    for (text, key, line, remedy) in [
        (
            "http:\n  secret: short\n",
            "http.secret",
            2,
            "at least 16 characters",
        ),
        (
            "http:\n  secrets: [long-enough-secret-0123, short]\n",
            "http.secrets[1]",
            2,
            "at least 16",
        ),
        (
            "http:\n  secret: 0123456789abcdef0123\n  secrets: [0123456789abcdef0123]\n",
            "http.secrets",
            3,
            "not both",
        ),
        (
            "http:\n  tls:\n    cert: /c.pem\n",
            "http.tls",
            2,
            "both `cert` and `key`",
        ),
        (
            "http:\n  metrics-secret: true\n",
            "http.metrics-secret",
            2,
            "needs a cluster secret",
        ),
        (
            "http:\n  accept-unsigned: true\n",
            "http.accept-unsigned",
            2,
            "set http.secret",
        ),
    ] {
        let error = parse_err(text);
        assert_names(&error, key, line);
        assert!(error.to_string().contains(remedy), "{error}");
    }

    // The secret may come from LTXFS_SECRET alone, also for metrics-secret.
    let env =
        |name: &str| (name == "LTXFS_SECRET").then(|| "from-the-environment-0123".to_string());
    let config = parse_with_env("http:\n  metrics-secret: true\n", Some(&env)).unwrap();
    assert_eq!(config.http.secrets[0].expose(), "from-the-environment-0123");
}
