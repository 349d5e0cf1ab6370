//! `watch()`: file events (including the kubelet's `..data` swap) and the periodic
//! rescan reload the store; dropping the handle stops it.

mod common;

use std::{fs, time::Duration};

use common::*;
use space_certs::CertStore;

const LIMIT: Duration = Duration::from_secs(10);

#[test]
fn kubernetes_data_symlink_swap_is_picked_up_by_file_events() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let v1 = ca.issue(&["ehr.example.org"]);
    let secret = write_secret(dir.path(), "ehr", "2024_01_01_00_00_00.1", &v1);
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    assert_eq!(served(&store, Some("ehr.example.org")).unwrap(), v1.leaf);

    // A long poll interval: only file events can trigger the reload in time.
    let watch = store.watch(Duration::from_secs(3600)).unwrap();
    assert!(watch.is_notify_active());
    let v2 = ca.issue(&["ehr.example.org"]);
    swap_secret(
        &secret,
        "2024_01_01_00_00_00.1",
        "2024_02_01_00_00_00.2",
        &v2,
    );

    assert!(
        eventually(LIMIT, || served(&store, Some("ehr.example.org")).unwrap()
            == v2.leaf),
        "new certificate not served within {LIMIT:?}: {:?}",
        store.summary()
    );
    assert!(store.stats().reloads_ok >= 1);
    drop(watch);
}

#[test]
fn periodic_rescan_picks_up_a_replaced_flat_pair() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let v1 = ca.issue(&["ehr.example.org"]);
    write_flat(dir.path(), "ehr", &v1);
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    let watch = store.watch_polling(Duration::from_millis(100)).unwrap();
    assert!(!watch.is_notify_active());

    let v2 = ca.issue(&["ehr.example.org"]);
    write_flat(dir.path(), "ehr", &v2);
    assert!(eventually(LIMIT, || served(
        &store,
        Some("ehr.example.org")
    )
    .unwrap()
        == v2.leaf));
}

#[test]
fn corrupted_file_under_watch_is_refused_and_old_certificate_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let v1 = ca.issue(&["ehr.example.org"]);
    let (crt, _) = write_flat(dir.path(), "ehr", &v1);
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    let _watch = store.watch(Duration::from_millis(500)).unwrap();

    fs::write(&crt, "garbage").unwrap();
    assert!(eventually(LIMIT, || store.stats().pairs_refused >= 1));
    assert_eq!(served(&store, Some("ehr.example.org")).unwrap(), v1.leaf);
    assert!(store.summary()[0].last_error.is_some());
}

#[test]
fn dropping_the_handle_stops_reloading() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let v1 = ca.issue(&["ehr.example.org"]);
    write_flat(dir.path(), "ehr", &v1);
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    let watch = store.watch(Duration::from_millis(50)).unwrap();
    drop(watch); // joins the watcher thread: no reload can run after this line

    write_flat(dir.path(), "ehr", &ca.issue(&["ehr.example.org"]));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(served(&store, Some("ehr.example.org")).unwrap(), v1.leaf);
    assert_eq!(store.stats().reloads_ok + store.stats().reloads_refused, 0);
}

#[test]
fn watching_a_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let sub = dir.path().join("certs");
    fs::create_dir(&sub).unwrap();
    write_flat(&sub, "ehr", &ca.issue(&["ehr.example.org"]));
    let store = CertStore::load_dir(&sub, None).unwrap();
    fs::remove_dir_all(&sub).unwrap();
    assert!(store.watch(Duration::from_secs(1)).is_err());
}
