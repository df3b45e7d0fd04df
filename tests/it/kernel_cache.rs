//! The core's API for invalidating what the kernel caches (which replicas use when
//! they change files behind the kernel's back), exercised on an in-process mount.

use std::sync::Arc;

use ltxfs::fs::Fs;
use ltxfs::fuse::MountedSession;
use ltxfs::ltx::{Checksum, Encoder, Header, TxId, page_checksum};
use ltxfs::store::{CaptureOptions, ChangeSetBytes, Role, Store};

/// A primary's store mounted in-process in a new temporary directory.
struct Mounted {
    dir: tempfile::TempDir,
    store: Arc<Store>,
    session: MountedSession,
}

impl Mounted {
    fn start() -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        let store = Arc::new(
            Store::open(
                &dir.path().join("data"),
                CaptureOptions::default(),
                Role::Primary,
            )
            .unwrap(),
        );
        let fs = Arc::new(Fs::new(store.clone(), 0, 0));
        let ended = tokio_util::sync::CancellationToken::new();
        let session = MountedSession::start(fs, &dir.path().join("mnt"), false, 2, ended)
            .unwrap_or_else(|e| panic!("cannot mount (tests need /dev/fuse and root): {e}"));
        Mounted {
            dir,
            store,
            session,
        }
    }

    /// The data dir, whose backing files the tests change behind the kernel.
    fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    fn mount_point(&self) -> std::path::PathBuf {
        self.dir.path().join("mnt")
    }

    fn unmount(self) {
        self.session.unmount();
    }
}

#[test]
fn invalidation_makes_changes_behind_the_kernel_visible() {
    let mounted = Mounted::start();
    let (data, mount_point, store) = (mounted.data(), mounted.mount_point(), &mounted.store);

    let through_mount = mount_point.join("cache.db-wal");
    std::fs::write(&through_mount, b"old contents").unwrap();
    assert_eq!(std::fs::read(&through_mount).unwrap(), b"old contents");

    // Change the backing file directly, as a replica applying a change set does.
    let backing = data.join("dbs").join("cache.db").join("wal");
    std::fs::write(&backing, b"new contents").unwrap();
    assert_eq!(
        std::fs::read(&through_mount).unwrap(),
        b"old contents",
        "the kernel keeps pages cached across opens, so the change is not yet visible"
    );

    store.invalidate("cache.db-wal");
    assert_eq!(std::fs::read(&through_mount).unwrap(), b"new contents");

    // A negative entry is cached too, and dropped by the same call.
    let missing = mount_point.join("later.db-shm");
    assert!(!missing.exists());
    store.create("later.db-shm").unwrap();
    store.invalidate("later.db-shm");
    assert!(
        missing.exists(),
        "the cached negative entry was not dropped"
    );

    mounted.unmount();
}

/// Regression test: under load, a reader on a replica now and then got the file
/// size from before an apply together with page 1 from after it, which SQLite
/// reports as "database disk image is malformed". A replica therefore never lets
/// the kernel keep attributes: every `stat` gets the size the file has now.
#[test]
fn a_replica_answers_every_stat_itself() {
    let mounted = Mounted::start();
    let (data, mount_point, store) = (mounted.data(), mounted.mount_point(), &mounted.store);
    let through_mount = mount_point.join("sizes.db-wal");
    let backing = data.join("dbs").join("sizes.db").join("wal");
    let size = || std::fs::metadata(&through_mount).unwrap().len();

    std::fs::write(&through_mount, b"12345").unwrap();
    assert_eq!(size(), 5);

    // A replica's files change behind the kernel: each stat asks ltxfs.
    store.set_role(Role::Replica);
    store.invalidate("sizes.db-wal");
    std::fs::write(&backing, b"1234567").unwrap();
    assert_eq!(size(), 7);
    std::fs::write(&backing, b"123456789").unwrap();
    assert_eq!(size(), 9, "the replica's attributes were cached");
    std::fs::write(&backing, b"1").unwrap();
    assert_eq!(size(), 1, "the replica's attributes were cached");

    mounted.unmount();
}

/// A change set from a primary: database `new.db` holding one 4096-byte page
/// (TXID 1), or, with `deleted`, that database deleted (TXID 2).
fn new_database_change_set(deleted: bool) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    page[..16].copy_from_slice(b"SQLite format 3\0");
    page[16..18].copy_from_slice(&4096u16.to_be_bytes());
    page[18] = 1;
    page[19] = 1;
    let with_page = Checksum(page_checksum(1, &page).0 | Checksum::FLAG);
    let txid = TxId(if deleted { 2 } else { 1 });
    let header = Header {
        page_size: 4096,
        commit: u32::from(!deleted),
        min_txid: txid,
        max_txid: txid,
        timestamp: 1,
        pre_apply_checksum: if deleted { with_page } else { Checksum(0) },
        ..Header::default()
    };
    let mut encoder = Encoder::new(Vec::new(), header).unwrap();
    if !deleted {
        encoder.encode_page(1, &page).unwrap();
    }
    let after = if deleted {
        Checksum(Checksum::FLAG)
    } else {
        with_page
    };
    encoder.finish(after).unwrap();
    encoder.into_inner()
}

/// Regression test: a replica that received a new database did not tell the
/// kernel, which had cached an application's failed lookup of it, so the
/// database and its `-pos` file stayed invisible for up to a second.
#[test]
fn a_database_a_replica_receives_or_loses_is_seen_at_once() {
    let mounted = Mounted::start();
    let (mount_point, store) = (mounted.mount_point(), &mounted.store);
    store.set_role(Role::Replica);
    let database = mount_point.join("new.db");
    let position = mount_point.join("new.db-pos");
    // The kernel now caches both names as missing for a second.
    assert!(!database.exists() && !position.exists());

    store
        .apply_change_set(
            "new.db",
            ChangeSetBytes::InMemory(new_database_change_set(false)),
        )
        .unwrap();
    assert!(database.exists(), "the new database is not visible");
    assert!(position.exists(), "its -pos file is not visible");

    store
        .apply_change_set(
            "new.db",
            ChangeSetBytes::InMemory(new_database_change_set(true)),
        )
        .unwrap();
    assert!(!database.exists(), "the deleted database is still visible");
    assert!(!position.exists(), "its -pos file is still visible");

    mounted.unmount();
}

/// The kernel opens the mount's directory without asking ltxfs (SQLite opens it
/// to sync it after creating a journal): listing and syncing it still work.
#[test]
fn the_root_lists_and_syncs_without_opening() {
    let mounted = Mounted::start();
    let mount_point = mounted.mount_point();
    std::fs::write(mount_point.join("listed.db-wal"), b"x").unwrap();
    for _ in 0..2 {
        let names: Vec<String> = std::fs::read_dir(&mount_point)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.contains(&"listed.db-wal".to_string()), "{names:?}");
        std::fs::File::open(&mount_point)
            .unwrap()
            .sync_all()
            .unwrap();
    }
    mounted.unmount();
}
