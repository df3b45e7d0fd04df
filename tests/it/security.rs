//! The node API's protections between separate `ltxfs mount` processes: the
//! cluster secret (replicas without it are refused, a primary without it is not
//! followed, a rotation across a rolling restart loses no write), mutual TLS with
//! a CA made in the test, and the zero-config default that listens only on
//! loopback (checked from another network namespace).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::*;
use rusqlite::params;
use test_support::{force_unmount, run_bounded, write_config, yaml_quote};

const DB: &str = "app.db";
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
const SECRET: &str = "cluster secret of the tests 0123";
const OTHER_SECRET: &str = "some other cluster's secret 0123";

/// The `http` section of a node.
#[derive(Clone, Default)]
struct Http {
    addr: String,
    secrets: Vec<&'static str>,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    metrics_secret: bool,
    accept_unsigned: bool,
}

impl Http {
    fn on(addr: &str) -> Http {
        Http {
            addr: addr.to_string(),
            ..Http::default()
        }
    }

    fn secrets(mut self, secrets: &[&'static str]) -> Http {
        self.secrets = secrets.to_vec();
        self
    }

    fn with_metrics_secret(mut self) -> Http {
        self.metrics_secret = true;
        self
    }

    fn yaml(&self) -> String {
        let mut yaml = format!("http:\n  addr: \"{}\"\n", self.addr);
        if self.metrics_secret {
            yaml.push_str("  metrics-secret: true\n");
        }
        if self.accept_unsigned {
            yaml.push_str("  accept-unsigned: true\n");
        }
        if !self.secrets.is_empty() {
            let list: Vec<String> = self.secrets.iter().map(|s| format!("\"{s}\"")).collect();
            yaml.push_str(&format!("  secrets: [{}]\n", list.join(", ")));
        }
        if let Some((cert, key, ca)) = &self.tls {
            yaml.push_str(&format!(
                "  tls:\n    cert: {}\n    key: {}\n    ca: {}\n",
                yaml_quote(&cert.to_string_lossy()),
                yaml_quote(&key.to_string_lossy()),
                yaml_quote(&ca.to_string_lossy())
            ));
        }
        yaml
    }
}

fn node_yaml(hostname: &str, candidate: bool, primary_url: Option<&str>, http: &Http) -> String {
    let mut yaml = format!(
        "lease:\n  type: static\n  candidate: {candidate}\n  hostname: {hostname}\n  reconnect-delay: 300ms\n"
    );
    if let Some(url) = primary_url {
        yaml.push_str(&format!("  advertise-url: {url}\n"));
    }
    yaml.push_str(&http.yaml());
    yaml
}

/// Starts a primary on a free port, then rewrites its config with that port so
/// that a restart listens on the same address. Returns the address.
fn start_primary(hostname: &str, http: Http) -> (Mount, String) {
    let primary = Mount::start(MountOptions {
        extra_yaml: node_yaml(hostname, true, None, &http),
        ..MountOptions::default()
    });
    let addr = primary.listen_addr();
    let http = Http {
        addr: addr.clone(),
        ..http
    };
    write_config(
        primary.config_path(),
        primary.data_dir(),
        None,
        &node_yaml(hostname, true, None, &http),
    )
    .expect("write ltxfs.yml");
    (primary, addr)
}

fn start_replica(hostname: &str, primary_url: &str, http: Http) -> Mount {
    Mount::start(MountOptions {
        extra_yaml: node_yaml(hostname, false, Some(primary_url), &http),
        ..MountOptions::default()
    })
}

fn position(mount: &Mount) -> Option<String> {
    fs::read_to_string(mount.db_path(&format!("{DB}-pos"))).ok()
}

fn write_rows(mount: &Mount, first: i64, count: i64) {
    let conn = open_db(&mount.db_path(DB));
    conn.execute_batch("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    for id in first..first + count {
        conn.execute("INSERT INTO t(id, v) VALUES (?1, 'row')", params![id])
            .unwrap();
    }
}

fn wait_converged(primary: &Mount, replica: &Mount) {
    let target = position(primary).expect("the primary has a position");
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    while position(replica).as_deref() != Some(target.as_str()) {
        assert!(
            Instant::now() < deadline,
            "replica at {:?}, primary at {target:?}; replica stderr:\n{}\nprimary stderr:\n{}",
            position(replica),
            replica.stderr_text(),
            primary.stderr_text()
        );
        thread::sleep(POLL);
    }
}

fn wait_for_log(mount: &Mount, parts: &[&str]) -> String {
    let mut found = String::new();
    wait_until(
        &format!("a log line with {parts:?}"),
        READY_TIMEOUT,
        || match mount
            .stderr_text()
            .lines()
            .find(|line| parts.iter().all(|part| line.contains(part)))
        {
            Some(line) => {
                found = line.to_string();
                true
            }
            None => false,
        },
    );
    found
}

/// Runs `ltxfs ARGS` with `LTXFS_SECRET` set to `secret` (or unset) in `dir`.
fn ltxfs_in(dir: &Path, args: &[&str], secret: Option<&str>) -> std::process::Output {
    let mut command = ltxfs_command();
    command
        .args(args)
        .current_dir(dir)
        .env_remove("LTXFS_SECRET");
    if let Some(secret) = secret {
        command.env("LTXFS_SECRET", secret);
    }
    run_bounded(READY_TIMEOUT, move || command.output())
        .expect("ltxfs finishes")
        .expect("run ltxfs")
}

#[test]
fn replicas_without_the_secret_are_refused_and_those_with_it_follow() {
    let (primary, addr) = start_primary("primary", Http::on("127.0.0.1:0").secrets(&[SECRET]));
    let url = format!("http://{addr}");
    write_rows(&primary, 1, 10);
    let trusted = start_replica("trusted", &url, Http::on("127.0.0.1:0").secrets(&[SECRET]));
    wait_converged(&primary, &trusted);

    let open = start_replica("open", &url, Http::on("127.0.0.1:0"));
    let other = start_replica(
        "other",
        &url,
        Http::on("127.0.0.1:0").secrets(&[OTHER_SECRET]),
    );
    let refused = wait_for_log(
        &primary,
        &["refused a call to the node API", "carries no ltxfs-auth"],
    );
    assert!(
        refused.contains("peer=127.0.0.1:"),
        "names the peer: {refused}"
    );
    wait_for_log(
        &primary,
        &["refused a call to the node API", "another cluster secret"],
    );
    wait_for_log(&open, &["not trusted"]);
    wait_for_log(&other, &["not trusted"]);
    // A node that names others and has no secret says how to close its API.
    wait_for_log(&open, &["the node API is open", "http.secret"]);
    assert!(!primary.stderr_text().contains("the node API is open"));
    for refused_replica in [&open, &other] {
        assert!(
            !refused_replica.db_path(DB).exists(),
            "a refused replica received a database"
        );
    }

    // The replica with the secret keeps following.
    write_rows(&primary, 11, 10);
    wait_converged(&primary, &trusted);

    // `ltxfs status` needs the secret too (run where no ltxfs.yml names it).
    let (_elsewhere, here) = temp_root("ltxfs-status-");
    let here = here.as_path();
    let denied = ltxfs_in(here, &["status", "--url", &url], None);
    assert_eq!(
        denied.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    assert!(String::from_utf8_lossy(&denied.stderr).contains("not trusted"));
    let allowed = ltxfs_in(here, &["status", "--url", &url], Some(SECRET));
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert!(String::from_utf8_lossy(&allowed.stdout).contains("primary"));
}

#[test]
fn a_replica_with_the_secret_does_not_follow_a_primary_without_it() {
    let (impostor, addr) = start_primary("impostor", Http::on("127.0.0.1:0"));
    write_rows(&impostor, 1, 5);
    let replica = start_replica(
        "replica",
        &format!("http://{addr}"),
        Http::on("127.0.0.1:0").secrets(&[SECRET]),
    );
    wait_for_log(&replica, &["does not prove it knows the cluster secret"]);
    assert!(
        !replica.db_path(DB).exists(),
        "the replica took the impostor's database"
    );
}

// ---------------------------------------------------------------------------------
// Mutual TLS
// ---------------------------------------------------------------------------------

/// A CA made for the test, which signs node certificates for 127.0.0.1.
struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// Writes a node certificate, its key and this CA into `dir`.
    fn node_files(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let paths = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}-ca.crt")),
        );
        fs::write(&paths.0, cert.pem()).unwrap();
        fs::write(&paths.1, key.serialize_pem()).unwrap();
        fs::write(&paths.2, &self.pem).unwrap();
        paths
    }
}

#[test]
fn mutual_tls_lets_certified_nodes_follow_and_refuses_another_ca() {
    let (dir, root) = temp_root("ltxfs-tls-");
    let ca = TestCa::new("cluster CA");
    let http = |name: &str, ca: &TestCa| Http {
        tls: Some(ca.node_files(&root, name)),
        ..Http::on("127.0.0.1:0").secrets(&[SECRET])
    };
    let (primary, addr) = start_primary("primary", http("primary", &ca));
    let url = format!("https://{addr}");
    write_rows(&primary, 1, 10);
    let replica = start_replica("replica", &url, http("replica", &ca));
    wait_converged(&primary, &replica);

    let foreign = start_replica("foreign", &url, http("foreign", &TestCa::new("another CA")));
    let refused = wait_for_log(&primary, &["refused a connection to the node API"]);
    assert!(
        refused.contains("peer=127.0.0.1:"),
        "names the peer: {refused}"
    );
    assert!(
        !foreign.db_path(DB).exists(),
        "a node of another CA received a database"
    );

    // Local tools connect with the node's own certificate and secret.
    let config = replica.config_path().to_string_lossy().into_owned();
    let status = ltxfs_in(&root, &["status", "--url", &url, "--config", &config], None);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    drop(dir);
}

// ---------------------------------------------------------------------------------
// Rotation
// ---------------------------------------------------------------------------------

/// A cluster without a secret turns one on (`http.accept-unsigned` while nodes
/// differ), then rotates it, one node restarting at a time, while a writer
/// commits on the primary.
#[test]
fn turning_the_secret_on_and_rotating_it_across_rolling_restarts_loses_no_write() {
    const OLD: &str = "the old cluster secret 012345678";
    const NEW: &str = "the new cluster secret 012345678";
    let (mut primary, addr) = start_primary("primary", Http::on("127.0.0.1:0"));
    let url = format!("http://{addr}");
    write_rows(&primary, 0, 1);
    let mut replicas: Vec<Mount> = ["replica-1", "replica-2"]
        .iter()
        .map(|name| start_replica(name, &url, Http::on("127.0.0.1:0")))
        .collect();

    // A writer commits rows one by one and counts those SQLite acknowledged; it
    // pauses while the primary restarts (its mount point is then not a mount).
    let db = primary.db_path(DB);
    let pause = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = thread::spawn({
        let (pause, stop) = (pause.clone(), stop.clone());
        move || {
            let mut acknowledged = 0i64;
            while !stop.load(Ordering::Acquire) {
                let _running = pause.lock().unwrap();
                let conn = open_db(&db);
                for _ in 0..5 {
                    acknowledged += 1;
                    conn.execute(
                        "INSERT INTO t(id, v) VALUES (?1, 'rotation')",
                        params![acknowledged],
                    )
                    .unwrap();
                }
                drop(conn);
                drop(_running);
                thread::sleep(Duration::from_millis(5));
            }
            acknowledged
        }
    });

    for (secrets, accept_unsigned) in [
        (&[OLD][..], true),
        (&[OLD][..], false),
        (&[OLD, NEW][..], false),
        (&[NEW, OLD][..], false),
        (&[NEW][..], false),
    ] {
        let http = |addr: &str| Http {
            accept_unsigned,
            ..Http::on(addr).secrets(secrets)
        };
        for (replica, name) in replicas.iter_mut().zip(["replica-1", "replica-2"]) {
            let yaml = node_yaml(name, false, Some(&url), &http("127.0.0.1:0"));
            write_config(replica.config_path(), replica.data_dir(), None, &yaml)
                .expect("write ltxfs.yml");
            replica.restart();
        }
        {
            let _paused = pause.lock().unwrap();
            let yaml = node_yaml("primary", true, None, &http(&addr));
            write_config(primary.config_path(), primary.data_dir(), None, &yaml)
                .expect("write ltxfs.yml");
            primary.restart();
        }
        // Every node follows under the new settings before the next step.
        let _paused = pause.lock().unwrap();
        for replica in &replicas {
            wait_converged(&primary, replica);
        }
    }
    stop.store(true, Ordering::Release);
    let acknowledged = writer.join().expect("the writer succeeds");
    assert!(acknowledged > 0);
    for replica in &replicas {
        wait_converged(&primary, replica);
    }
    for node in std::iter::once(&primary).chain(&replicas) {
        let conn = open_db(&node.db_path(DB));
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t WHERE v = 'rotation'", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(rows, acknowledged, "a node lost acknowledged writes");
    }
    for replica in &replicas {
        assert!(
            !replica.stderr_text().contains("refused a call")
                && !replica.stderr_text().contains("not trusted"),
            "{}",
            replica.stderr_text()
        );
    }
    assert!(
        !primary.stderr_text().contains("refused a call"),
        "{}",
        primary.stderr_text()
    );
}

// ---------------------------------------------------------------------------------
// Zero config
// ---------------------------------------------------------------------------------

/// `ltxfs mount DIR` run in `cwd` with no config file at all.
struct ZeroConfigMount {
    child: Child,
    mount_point: PathBuf,
}

impl ZeroConfigMount {
    fn start(cwd: &Path, name: &str) -> ZeroConfigMount {
        let stderr = fs::File::create(cwd.join(format!("{name}.stderr"))).unwrap();
        let child = ltxfs_command()
            .args(["mount", name])
            .current_dir(cwd)
            .env_remove("LTXFS_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn ltxfs");
        let mount = ZeroConfigMount {
            child,
            mount_point: cwd.join(name),
        };
        wait_until("the zero-config mount", READY_TIMEOUT, || {
            is_mounted(&mount.mount_point)
        });
        mount
    }

    /// The URL the node recorded in its data dir (`<mount>.ltxfs/api-url`).
    fn api_url(&self) -> String {
        let data_dir = self.mount_point.with_extension("ltxfs");
        fs::read_to_string(data_dir.join("api-url"))
            .expect("the node records its API's URL")
            .trim()
            .to_string()
    }
}

impl Drop for ZeroConfigMount {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGTERM);
        if wait_timeout(&mut self.child, STOP_TIMEOUT).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = force_unmount(&self.mount_point);
    }
}

/// A network namespace joined to this one by a veth pair: this side is
/// `10.254.<n>.1`, the namespace's side `.2`. Removed on drop.
struct NetNs {
    name: String,
    host_ip: String,
}

impl NetNs {
    fn new() -> NetNs {
        let n = std::process::id() % 250;
        let name = format!("ltxfs-test-{}", std::process::id());
        let host_veth = format!("lx{}h", std::process::id() % 100_000);
        let ns_veth = format!("lx{}n", std::process::id() % 100_000);
        let host_ip = format!("10.254.{n}.1");
        let netns = NetNs {
            name: name.clone(),
            host_ip: host_ip.clone(),
        };
        for args in [
            vec!["netns", "add", &name],
            vec![
                "link", "add", &host_veth, "type", "veth", "peer", "name", &ns_veth,
            ],
            vec!["link", "set", &ns_veth, "netns", &name],
            vec!["addr", "add", &format!("{host_ip}/24"), "dev", &host_veth],
            vec!["link", "set", &host_veth, "up"],
            vec![
                "-n",
                &name,
                "addr",
                "add",
                &format!("10.254.{n}.2/24"),
                "dev",
                &ns_veth,
            ],
            vec!["-n", &name, "link", "set", &ns_veth, "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let status = Command::new("ip")
                .args(&args)
                .status()
                .expect("run ip (iproute2)");
            assert!(status.success(), "ip {args:?} failed");
        }
        netns
    }

    /// Whether a TCP connection from inside the namespace to `port` on this side
    /// succeeds.
    fn can_connect(&self, port: u16) -> bool {
        let script = format!("exec 3<>/dev/tcp/{}/{port}", self.host_ip);
        let mut command = Command::new("ip");
        command
            .args([
                "netns", "exec", &self.name, "timeout", "5", "bash", "-c", &script,
            ])
            .stderr(Stdio::null());
        run_bounded(READY_TIMEOUT, move || command.status())
            .expect("the connection attempt finishes")
            .expect("run ip netns exec")
            .success()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it ours.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

#[test]
fn zero_config_mounts_listen_only_on_loopback_and_run_side_by_side() {
    require_fuse();
    let (dir, root) = temp_root("ltxfs-zero-");
    let first = ZeroConfigMount::start(&root, "one");
    let second = ZeroConfigMount::start(&root, "two");
    let (first_url, second_url) = (first.api_url(), second.api_url());
    assert!(first_url.starts_with("http://127.0.0.1:"), "{first_url}");
    assert!(second_url.starts_with("http://127.0.0.1:"), "{second_url}");
    assert_ne!(first_url, second_url, "two zero-config mounts share a port");

    // Local tools find their node without flags: in the mount, or with --mount.
    let status = ltxfs_in(&first.mount_point, &["status"], None);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("primary"));
    let status = ltxfs_in(&root, &["status", "--mount", "two"], None);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    // From another network namespace, the zero-config API cannot be reached, while
    // a node told to listen on every interface can (so the check can fail).
    let netns = NetNs::new();
    assert!(
        !netns.can_connect(port_of(&first_url)),
        "the zero-config API is reachable"
    );
    let open = Mount::start(MountOptions {
        extra_yaml: "http:\n  addr: \"0.0.0.0:0\"\n".to_string(),
        ..MountOptions::default()
    });
    let open_port: u16 = open
        .listen_addr()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        netns.can_connect(open_port),
        "the namespace reaches no listener at all"
    );
    drop((first, second));
    drop(dir);
}

/// `GET /metrics` on `addr` with an optional bearer token; returns the status line.
fn get_metrics(addr: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(READY_TIMEOUT)).unwrap();
    let authorization = token.map_or(String::new(), |token| {
        format!("Authorization: Bearer {token}\r\n")
    });
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.lines().next().unwrap_or_default().to_string()
}

#[test]
fn metrics_stay_readable_unless_metrics_secret_is_set() {
    let (open_metrics, addr) = start_primary("primary", Http::on("127.0.0.1:0").secrets(&[SECRET]));
    assert!(
        get_metrics(&addr, None).contains(" 200 "),
        "metrics are open by default"
    );
    drop(open_metrics);

    let (_closed, addr) = start_primary(
        "primary",
        Http::on("127.0.0.1:0")
            .secrets(&[SECRET])
            .with_metrics_secret(),
    );
    assert!(get_metrics(&addr, None).contains(" 401 "));
    assert!(get_metrics(&addr, Some(OTHER_SECRET)).contains(" 401 "));
    assert!(get_metrics(&addr, Some(SECRET)).contains(" 200 "));
}
