//! What the backup tests share: committing rows to `app.db` on a mount,
//! running `ltxfs` commands against a destination, waiting until a backup
//! reaches a TXID, checking a restored file (its LTX checksum recomputed from
//! its pages, its rows, its integrity) against the mount it came from, and
//! checking that a mount with a destination it cannot use exits before it
//! mounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::{Mount, is_mounted, ltxfs_command};
use ltxfs::ltx::{Checksum, checksum_database};
use test_support::{write_config, yaml_quote};

/// How long a backup may take to reach the destination in these tests.
pub const BACKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// One transaction of one row in `app.db`'s table `t(id, v)`; returns (TXID,
/// checksum) after it.
pub fn insert(connection: &rusqlite::Connection, mount: &Mount, value: i64) -> (u64, Checksum) {
    connection
        .execute("INSERT INTO t(v) VALUES (?1)", [value])
        .expect("insert");
    position(mount, "app.db")
}

/// `<mount>/<name>-pos` as (TXID, checksum).
pub fn position(mount: &Mount, name: &str) -> (u64, Checksum) {
    let text = fs::read_to_string(mount.path().join(format!("{name}-pos"))).expect("read -pos");
    let (txid, checksum) = text.trim_end().split_once('/').expect("TXID/checksum");
    (
        u64::from_str_radix(txid, 16).expect("hex TXID"),
        Checksum(u64::from_str_radix(checksum, 16).expect("hex checksum")),
    )
}

/// Runs `ltxfs ARGS...` to completion.
pub fn ltxfs(args: &[&str]) -> Output {
    ltxfs_command().args(args).output().expect("run ltxfs")
}

pub fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The latest TXID `ltxfs backup list --json` reports for `name`.
pub fn backed_up_txid(source: &[&str], name: &str) -> Option<u64> {
    let mut args = vec!["backup", "list", "--json", "--name", name];
    args.extend_from_slice(source);
    let output = ltxfs(&args);
    assert!(output.status.success(), "{}", text(&output));
    let list: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    list.as_array()?.first()?.get("latest_txid")?.as_u64()
}

/// Waits until the destination holds `name` up to `txid`.
pub fn wait_for_backup(source: &[&str], name: &str, txid: u64, mount: &Mount) {
    let deadline = Instant::now() + BACKUP_TIMEOUT;
    while backed_up_txid(source, name) != Some(txid) {
        assert!(
            Instant::now() < deadline,
            "the backup of {name} did not reach TXID {txid} (it is at {:?}); ltxfs stderr:\n{}",
            backed_up_txid(source, name),
            mount.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The database checksum of a plain SQLite file, page by page.
pub fn file_checksum(path: &Path) -> Checksum {
    let bytes = fs::read(path).expect("read restored file");
    let page_size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65536,
        size => u32::from(size),
    };
    let pages = (bytes.len() / page_size as usize) as u32;
    checksum_database(&bytes[..], page_size, pages).expect("checksum")
}

pub fn count_rows(path: &Path) -> i64 {
    let connection = rusqlite::Connection::open(path).expect("open restored database");
    let check: String = connection
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
    connection
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .expect("count rows")
}

/// Runs `ltxfs restore` of `name` from `source` into `output` with `extra`
/// arguments, whatever its outcome.
pub fn try_restore(source: &[&str], name: &str, output: &Path, extra: &[&str]) -> Output {
    let output_text = output.to_string_lossy().to_string();
    let mut args = vec!["restore", "--name", name];
    args.extend_from_slice(source);
    args.extend_from_slice(extra);
    args.push(&output_text);
    ltxfs(&args)
}

/// Restores `name` from `source` into `output` with `extra` arguments;
/// panics unless it succeeds. Returns what it printed.
pub fn restore(source: &[&str], name: &str, output: &Path, extra: &[&str]) -> String {
    let result = try_restore(source, name, output, extra);
    assert!(result.status.success(), "{}", text(&result));
    String::from_utf8_lossy(&result.stdout).to_string()
}

/// Writes `<root>/ltxfs.yml` (data dir `<root>/data`, mount point `<root>/mnt`)
/// with `extra_yaml` and runs `ltxfs mount` with it, which must exit 2 without
/// mounting or creating the data dir. Returns its output.
pub fn refused_mount(root: &Path, extra_yaml: &str) -> Output {
    let mnt = root.join("mnt");
    let data = root.join("data");
    let config = root.join("ltxfs.yml");
    write_config(&config, &data, Some(&mnt), extra_yaml).expect("write ltxfs.yml");
    let output = ltxfs(&["mount", "--config", &config.to_string_lossy()]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(!is_mounted(&mnt));
    assert!(!data.exists(), "the data dir was created");
    output
}

pub fn backup_yaml(url: &str, more: &str) -> String {
    format!(
        "backup:\n  sync-interval: 100ms\n  destinations:\n    - url: {}\n{more}",
        yaml_quote(url)
    )
}

/// Every object file under `dir`, recursively.
pub fn object_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            found.extend(object_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "ltx") {
            found.push(path);
        }
    }
    found.sort();
    found
}
