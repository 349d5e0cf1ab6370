//! SNI selection through real rustls handshakes: exact, wildcard, default, no SNI.

mod common;

use common::*;
use rustls::pki_types::ServerName;
use space_certs::CertStore;
use tempfile::TempDir;

struct Fixture {
    _dir: TempDir,
    ca: Ca,
    store: CertStore,
    alpha: Issued,
    ehr: Issued,
    wild: Issued,
}

fn fixture(default_name: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let alpha = ca.issue(&["alpha.test"]);
    let ehr = ca.issue(&["ehr.example.org"]);
    let wild = ca.issue(&["*.example.org"]);
    write_flat(dir.path(), "alpha", &alpha);
    write_flat(dir.path(), "ehr", &ehr);
    write_flat(dir.path(), "wild", &wild);
    let store = CertStore::load_dir(dir.path(), default_name).unwrap();
    Fixture {
        _dir: dir,
        ca,
        store,
        alpha,
        ehr,
        wild,
    }
}

fn verified(
    f: &Fixture,
    name: &str,
) -> Result<rustls::pki_types::CertificateDer<'static>, rustls::Error> {
    handshake(
        server_config(&f.store),
        verifying_client(&f.ca),
        ServerName::try_from(name.to_owned()).unwrap(),
    )
}

#[test]
fn exact_name_is_served_and_verifies() {
    let f = fixture(None);
    assert_eq!(verified(&f, "ehr.example.org").unwrap(), f.ehr.leaf);
}

#[test]
fn wildcard_covers_one_label_and_verifies() {
    let f = fixture(None);
    assert_eq!(verified(&f, "portal.example.org").unwrap(), f.wild.leaf);
}

#[test]
fn exact_beats_wildcard() {
    let f = fixture(None);
    // ehr.example.org matches both ehr (exact) and wild (*.example.org).
    assert_eq!(
        served(&f.store, Some("ehr.example.org")).unwrap(),
        f.ehr.leaf
    );
}

#[test]
fn wildcard_does_not_cover_two_labels_or_the_apex() {
    let f = fixture(None);
    assert_eq!(
        served(&f.store, Some("a.b.example.org")).unwrap(),
        f.alpha.leaf
    );
    assert_eq!(served(&f.store, Some("example.org")).unwrap(), f.alpha.leaf);
    // And a verifying client rejects the default certificate for those names.
    assert!(verified(&f, "a.b.example.org").is_err());
}

#[test]
fn unknown_name_and_no_sni_get_the_first_pair_by_name() {
    let f = fixture(None);
    assert_eq!(
        served(&f.store, Some("unknown.test")).unwrap(),
        f.alpha.leaf
    );
    assert_eq!(served(&f.store, None).unwrap(), f.alpha.leaf);
    assert!(f
        .store
        .summary()
        .iter()
        .any(|s| s.name == "alpha" && s.is_default));
}

#[test]
fn configured_default_is_served_for_unknown_names_and_no_sni() {
    let f = fixture(Some("wild"));
    assert_eq!(served(&f.store, Some("unknown.test")).unwrap(), f.wild.leaf);
    assert_eq!(served(&f.store, None).unwrap(), f.wild.leaf);
    assert_eq!(
        served(&f.store, Some("ehr.example.org")).unwrap(),
        f.ehr.leaf
    );
}

#[test]
fn sni_compares_case_insensitively() {
    let f = fixture(None);
    assert_eq!(
        served(&f.store, Some("EHR.Example.ORG")).unwrap(),
        f.ehr.leaf
    );
    assert_eq!(
        served(&f.store, Some("Portal.EXAMPLE.org")).unwrap(),
        f.wild.leaf
    );
}

#[test]
fn kubernetes_secret_and_flat_pairs_mix() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let wild = ca.issue(&["*.example.org"]);
    let portal = ca.issue(&["portal.example.org"]);
    write_flat(dir.path(), "wild", &wild);
    write_secret(dir.path(), "portal", "2024_01_01_00_00_00.1", &portal);
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    let names: Vec<_> = store
        .summary()
        .into_iter()
        .map(|s| (s.name, s.layout))
        .collect();
    assert_eq!(
        names,
        vec![
            ("portal".to_owned(), space_certs::Layout::Kubernetes),
            ("wild".to_owned(), space_certs::Layout::Flat)
        ]
    );
    let f = |name: &str| {
        handshake(
            server_config(&store),
            verifying_client(&ca),
            ServerName::try_from(name.to_owned()).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(f("portal.example.org"), portal.leaf);
    assert_eq!(f("ehr.example.org"), wild.leaf);
}

#[test]
fn common_name_is_used_only_without_san_dns_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "legacy.example.net");
    params.distinguished_name = dn;
    let legacy = ca.issue_with(params);
    let first = ca.issue(&["aaa.test"]);
    write_flat(dir.path(), "aaa", &first);
    write_flat(dir.path(), "legacy", &legacy);
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    assert_eq!(
        served(&store, Some("legacy.example.net")).unwrap(),
        legacy.leaf
    );
    let summary = store.summary();
    assert_eq!(summary[1].dns_names, vec!["legacy.example.net".to_owned()]);
}

#[test]
fn summary_describes_each_pair() {
    use sha2::{Digest, Sha256};
    let f = fixture(None);
    let summary = f.store.summary();
    assert_eq!(summary.len(), 3);
    let ehr = summary.iter().find(|s| s.name == "ehr").unwrap();
    assert_eq!(ehr.dns_names, vec!["ehr.example.org".to_owned()]);
    assert_eq!(ehr.sha256, hex::encode(Sha256::digest(f.ehr.leaf.as_ref())));
    assert_eq!(ehr.chain_len, 2);
    assert!(ehr.cert_path.ends_with("ehr.crt"));
    assert!(ehr.key_path.ends_with("ehr.key"));
    assert!(!ehr.expired);
    assert!(ehr.not_after > ehr.not_before);
    assert!(ehr.not_after_rfc3339.ends_with('Z'));
    let json = serde_json::to_value(ehr).unwrap();
    assert_eq!(json["name"], "ehr");
    assert_eq!(json["layout"], "flat");
    assert!(json["cert_path"].as_str().unwrap().ends_with("ehr.crt"));
}
