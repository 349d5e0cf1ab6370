//! `ensure_dev_cert`: creates a loadable self-signed pair with a private key file,
//! reuses it while good, regenerates it when broken.

mod common;

use std::{fs, os::unix::fs::PermissionsExt};

use common::*;
use rustls::{pki_types::ServerName, RootCertStore};
use space_certs::{ensure_dev_cert, CertStore};

const NAMES: &[&str] = &["localhost", "127.0.0.1", "*.localhost"];

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn creates_a_loadable_pair_with_private_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state/certs");
    let (crt, key) = ensure_dev_cert(&dir, "dev", NAMES).unwrap();
    assert_eq!(crt, dir.join("dev.crt"));
    assert_eq!(key, dir.join("dev.key"));
    assert_eq!(mode(&key), 0o600);
    assert_eq!(mode(&dir), 0o700);
    // No temp files left behind.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);

    let store = CertStore::load_dir(&dir, None).unwrap();
    let summary = &store.summary()[0];
    assert_eq!(
        summary.dns_names,
        vec!["localhost".to_owned(), "*.localhost".to_owned()]
    );
    assert_eq!(summary.ip_addresses, vec!["127.0.0.1".to_owned()]);
    let year = 365 * 86_400;
    assert!((summary.not_after - summary.not_before - year - 86_400).abs() <= 86_400);
    assert!(space_certs::validate_dir(&dir).is_empty());

    // A client trusting the self-signed certificate verifies it by name and by IP.
    // (webpki, like browsers, refuses `*.localhost`: a wildcard over a single label.)
    let pem = fs::read(&crt).unwrap();
    let der = rustls_pemfile::certs(&mut &pem[..])
        .next()
        .unwrap()
        .unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let client = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    for name in ["localhost", "127.0.0.1"] {
        let got = handshake(
            server_config(&store),
            client.clone(),
            ServerName::try_from(name).unwrap(),
        )
        .unwrap();
        assert_eq!(got, der, "{name}");
    }
}

#[test]
fn is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let first = ensure_dev_cert(tmp.path(), "dev", NAMES).unwrap();
    let crt = fs::read(&first.0).unwrap();
    let key = fs::read(&first.1).unwrap();
    let second = ensure_dev_cert(tmp.path(), "dev", NAMES).unwrap();
    assert_eq!(first, second);
    assert_eq!(fs::read(&second.0).unwrap(), crt);
    assert_eq!(fs::read(&second.1).unwrap(), key);
}

#[test]
fn broken_pair_is_regenerated() {
    let tmp = tempfile::tempdir().unwrap();
    let (crt, key) = ensure_dev_cert(tmp.path(), "dev", NAMES).unwrap();
    fs::write(&crt, "garbage").unwrap();
    ensure_dev_cert(tmp.path(), "dev", NAMES).unwrap();
    assert!(CertStore::load_dir(tmp.path(), None).is_ok());

    // A key from elsewhere (mismatch) is not reused either.
    let other = Ca::new().issue(&["localhost"]);
    fs::write(&key, &other.key_pem).unwrap();
    ensure_dev_cert(tmp.path(), "dev", NAMES).unwrap();
    assert!(CertStore::load_dir(tmp.path(), None).is_ok());
    assert_eq!(mode(&key), 0o600);
}

#[test]
fn new_names_regenerate_and_loose_key_mode_is_tightened() {
    let tmp = tempfile::tempdir().unwrap();
    let (crt, key) = ensure_dev_cert(tmp.path(), "dev", &["localhost"]).unwrap();
    let before = fs::read(&crt).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    ensure_dev_cert(tmp.path(), "dev", &["localhost"]).unwrap();
    assert_eq!(mode(&key), 0o600);
    assert_eq!(fs::read(&crt).unwrap(), before);

    ensure_dev_cert(tmp.path(), "dev", &["localhost", "ehr.localhost"]).unwrap();
    assert_ne!(fs::read(&crt).unwrap(), before);
    let store = CertStore::load_dir(tmp.path(), None).unwrap();
    assert!(store.summary()[0]
        .dns_names
        .contains(&"ehr.localhost".to_owned()));
}

#[test]
fn bad_arguments_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(ensure_dev_cert(tmp.path(), "", NAMES).is_err());
    assert!(ensure_dev_cert(tmp.path(), "../x", NAMES).is_err());
    assert!(ensure_dev_cert(tmp.path(), "dev", &[]).is_err());
}
