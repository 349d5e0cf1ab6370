//! `reload()`: per-pair refusal keeps the old certificate served; good changes apply.

mod common;

use std::fs;

use common::*;
use space_certs::{CertError, CertStore};

fn setup() -> (tempfile::TempDir, Ca, CertStore, Issued, Issued) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let ehr = ca.issue(&["ehr.example.org"]);
    let portal = ca.issue(&["portal.example.org"]);
    write_flat(dir.path(), "ehr", &ehr);
    write_flat(dir.path(), "portal", &portal);
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    (dir, ca, store, ehr, portal)
}

#[test]
fn corrupted_certificate_keeps_the_old_one_served() {
    let (dir, _ca, store, ehr, _) = setup();
    let crt = dir.path().join("ehr.crt");
    fs::write(
        &crt,
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();

    let report = store.reload();
    assert_eq!(report.refused.len(), 1, "{report:?}");
    let refusal = &report.refused[0];
    assert_eq!(refusal.name.as_deref(), Some("ehr"));
    assert!(refusal.kept_previous);
    assert_eq!(refusal.error.path(), crt);
    assert!(!report.changed());
    assert_eq!(served(&store, Some("ehr.example.org")).unwrap(), ehr.leaf);

    let summary = store.summary();
    let entry = summary.iter().find(|s| s.name == "ehr").unwrap();
    assert!(entry.last_error.as_deref().unwrap().contains("ehr.crt"));
    let stats = store.stats();
    assert_eq!(
        (stats.reloads_ok, stats.reloads_refused, stats.pairs_refused),
        (0, 1, 1)
    );
    assert_eq!(stats.certificates, 2);
}

#[test]
fn replaced_pair_serves_the_new_certificate() {
    let (dir, ca, store, ehr, _) = setup();
    let renewed = ca.issue(&["ehr.example.org"]);
    assert_ne!(renewed.leaf, ehr.leaf);
    write_flat(dir.path(), "ehr", &renewed);

    let report = store.reload();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.updated, vec!["ehr".to_owned()]);
    assert_eq!(report.unchanged, vec!["portal".to_owned()]);
    assert_eq!(
        served(&store, Some("ehr.example.org")).unwrap(),
        renewed.leaf
    );
    assert_eq!(store.stats().reloads_ok, 1);
}

#[test]
fn half_rotated_pair_is_refused_until_the_key_arrives() {
    let (dir, ca, store, ehr, _) = setup();
    let renewed = ca.issue(&["ehr.example.org"]);
    // New certificate, old key still in place.
    fs::write(dir.path().join("ehr.crt"), &renewed.chain_pem).unwrap();
    let report = store.reload();
    assert!(matches!(
        report.refused[..],
        [space_certs::Refusal {
            kept_previous: true,
            error: CertError::KeyMismatch { .. },
            ..
        }]
    ));
    assert_eq!(served(&store, Some("ehr.example.org")).unwrap(), ehr.leaf);

    fs::write(dir.path().join("ehr.key"), &renewed.key_pem).unwrap();
    let report = store.reload();
    assert!(report.is_ok());
    assert_eq!(report.updated, vec!["ehr".to_owned()]);
    assert_eq!(
        served(&store, Some("ehr.example.org")).unwrap(),
        renewed.leaf
    );
    assert!(store.summary().iter().all(|s| s.last_error.is_none()));
}

#[test]
fn added_and_removed_pairs_apply() {
    let (dir, ca, store, ehr, portal) = setup();
    let extra = ca.issue(&["extra.example.org"]);
    write_flat(dir.path(), "extra", &extra);
    fs::remove_file(dir.path().join("portal.crt")).unwrap();
    fs::remove_file(dir.path().join("portal.key")).unwrap();

    let report = store.reload();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.added, vec!["extra".to_owned()]);
    assert_eq!(report.removed, vec!["portal".to_owned()]);
    assert_eq!(
        served(&store, Some("extra.example.org")).unwrap(),
        extra.leaf
    );
    // portal.example.org now falls back to the default (first by name: ehr).
    let got = served(&store, Some("portal.example.org")).unwrap();
    assert_ne!(got, portal.leaf);
    assert_eq!(got, ehr.leaf);
}

#[test]
fn new_bad_pair_is_refused_and_not_added() {
    let (dir, _ca, store, _, _) = setup();
    fs::write(dir.path().join("broken.crt"), "garbage").unwrap();
    fs::write(dir.path().join("broken.key"), "garbage").unwrap();
    let report = store.reload();
    assert_eq!(report.refused.len(), 1);
    assert!(!report.refused[0].kept_previous);
    assert_eq!(store.summary().len(), 2);
}

#[test]
fn emptied_directory_keeps_the_last_good_set() {
    let (dir, _ca, store, ehr, _) = setup();
    for f in ["ehr.crt", "ehr.key", "portal.crt", "portal.key"] {
        fs::remove_file(dir.path().join(f)).unwrap();
    }
    let report = store.reload();
    assert!(matches!(
        report.refused[..],
        [space_certs::Refusal {
            name: None,
            kept_previous: true,
            error: CertError::NoPairs { .. }
        }]
    ));
    assert!(report.removed.is_empty());
    assert_eq!(store.summary().len(), 2);
    assert_eq!(served(&store, Some("ehr.example.org")).unwrap(), ehr.leaf);
}

#[test]
fn unchanged_directory_reports_no_change() {
    let (_dir, _ca, store, _, _) = setup();
    let report = store.reload();
    assert!(report.is_ok() && !report.changed());
    assert_eq!(
        report.unchanged,
        vec!["ehr".to_owned(), "portal".to_owned()]
    );
}
