//! Backups to Google Cloud Storage (`gs://`) and Azure Blob Storage (`az://`),
//! end to end, against emulators the tests start on free loopback ports:
//! fake-gcs-server (behind a front that adapts the one XML API request it lacks,
//! the single-request upload: see tests/it/support/gcs.rs) and Azurite. A real mount
//! backs up with the emulator's endpoint and credentials as the destination's
//! config keys (GCS: `endpoint` and `service-account`, a key file with
//! `"disable_oauth": true`; Azure: `endpoint`, `account-name` and `account-key`);
//! `ltxfs backup list`, `ltxfs restore` and `ltxfs backup verify` then run as
//! separate processes from the mount's config. Restored databases are checked
//! against the mount's `-pos` checksum, recomputed from the restored file's
//! pages, and with `PRAGMA integrity_check`. A bucket or container that does not
//! exist stops a mount before it starts, with no credential in its message.

use std::fs;
use std::time::Duration;

use crate::common::*;
use crate::support::backup_check::*;
use crate::support::{azure, gcs};
use test_support::yaml_quote;

/// Rounds of commits, a sync interval apart, so the rows span several objects.
const ROUNDS: i64 = 4;
/// Commits (one row each) per round.
const COMMITS_PER_ROUND: i64 = 5;

/// Backs `app.db` up from a mount to `url` (with the destination's other keys
/// in `destination`), in several transactions; restores its latest state and
/// an earlier TXID from the mount's config and checks them; verifies the
/// backup. `secret`, if any, must reach no output. `server_log` is the
/// emulator's log, for failure messages.
fn back_up_restore_and_verify(
    url: &str,
    destination: &str,
    secret: Option<&str>,
    server_log: &dyn Fn() -> String,
) {
    let mount = Mount::start(MountOptions {
        extra_yaml: backup_yaml(url, destination),
        ..MountOptions::default()
    });
    let config = mount.config_path().to_string_lossy().to_string();
    let source = ["--config", config.as_str()];
    let connection = rusqlite::Connection::open(mount.db_path("app.db")).expect("open");
    connection
        .execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER);",
        )
        .expect("schema");
    let mut history = Vec::new();
    for round in 0..ROUNDS {
        for value in 0..COMMITS_PER_ROUND {
            history.push(insert(&connection, &mount, round * 100 + value));
        }
        // Let a sync interval pass: the next round goes into other objects.
        std::thread::sleep(Duration::from_millis(250));
    }
    let (txid, checksum) = position(&mount, "app.db");
    assert_eq!(history.last(), Some(&(txid, checksum)));
    wait_for_backup(&source, "app.db", txid, &mount);

    let scratch = mount.root().join("restored");
    fs::create_dir(&scratch).expect("scratch dir");
    let latest = scratch.join("latest.db");
    let printed = restore(&source, "app.db", &latest, &[]);
    assert!(printed.contains(&format!("{txid:016x}")), "{printed}");
    assert_eq!(
        file_checksum(&latest),
        checksum,
        "the restored database differs from the mount's; emulator log:\n{}",
        server_log()
    );
    assert_eq!(count_rows(&latest), ROUNDS * COMMITS_PER_ROUND);

    // A TXID in the middle, from the objects of the first rounds only.
    let index = history.len() / 2;
    let (middle_txid, middle_checksum) = history[index];
    let middle = scratch.join("middle.db");
    restore(
        &source,
        "app.db",
        &middle,
        &["--txid", &middle_txid.to_string()],
    );
    assert_eq!(
        file_checksum(&middle),
        middle_checksum,
        "TXID {middle_txid}"
    );
    assert_eq!(count_rows(&middle), index as i64 + 1, "TXID {middle_txid}");

    let output = ltxfs(&["backup", "verify", "--config", &config]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("are sound"), "{}", text(&output));
    if let Some(secret) = secret {
        assert!(!text(&output).contains(secret), "{}", text(&output));
        assert!(
            !mount.stderr_text().contains(secret),
            "a secret reached the log:\n{}",
            mount.stderr_text()
        );
    }
}

/// `ltxfs mount` with a destination whose bucket or container does not exist,
/// or whose credentials are refused, exits 2 before mounting, naming the URL
/// and not `secret` (if any).
fn an_unusable_destination_stops_the_mount(url: &str, destination: &str, secret: Option<&str>) {
    let (_dir, root) = temp_root("ltxfs-backup-clouds-missing-");
    let output = refused_mount(&root, &backup_yaml(url, destination));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(url), "{stderr}");
    if let Some(secret) = secret {
        assert!(!stderr.contains(secret), "{stderr}");
    }
}

#[test]
fn a_gcs_backup_restores_and_verifies() {
    let server = gcs::GcsServer::start();
    server.create_bucket("backups");
    let destination = format!(
        "      endpoint: {}\n      service-account: {}\n",
        yaml_quote(server.endpoint()),
        yaml_quote(&server.service_account().to_string_lossy())
    );
    // The emulator's key file holds no secret.
    back_up_restore_and_verify("gs://backups/prod", &destination, None, &|| server.log());
    // fake-gcs-server does not enforce the precondition; every upload must
    // carry it, so that GCS refuses to overwrite an object of that name.
    let uploads = server.uploads();
    assert!(!uploads.is_empty(), "no upload passed the front");
    for upload in &uploads {
        assert_eq!(
            upload.generation_match.as_deref(),
            Some("0"),
            "{} was uploaded without x-goog-if-generation-match: 0",
            upload.object
        );
    }
    an_unusable_destination_stops_the_mount("gs://missing-bucket/prod", &destination, None);
}

#[test]
fn an_azure_backup_restores_and_verifies() {
    let server = azure::AzuriteServer::start();
    server.create_container("backups");
    let destination = format!(
        "      endpoint: {}\n      account-name: {}\n      account-key: {}\n",
        yaml_quote(server.endpoint()),
        yaml_quote(azure::ACCOUNT),
        yaml_quote(azure::ACCOUNT_KEY)
    );
    back_up_restore_and_verify(
        "az://backups/prod",
        &destination,
        Some(azure::ACCOUNT_KEY),
        &|| server.log(),
    );
    an_unusable_destination_stops_the_mount(
        "az://missing-container/prod",
        &destination,
        Some(azure::ACCOUNT_KEY),
    );
    // Azurite checks signatures: a wrong key is refused at start too, and the
    // message names the destination, not the key.
    let wrong_key = "d3JvbmcgYWNjb3VudCBrZXkgZm9yIHRoZSB0ZXN0cyBvZiBsdHhmcw==";
    let wrong = format!(
        "      endpoint: {}\n      account-name: {}\n      account-key: {}\n",
        yaml_quote(server.endpoint()),
        yaml_quote(azure::ACCOUNT),
        yaml_quote(wrong_key)
    );
    an_unusable_destination_stops_the_mount("az://backups/prod", &wrong, Some(wrong_key));
}
