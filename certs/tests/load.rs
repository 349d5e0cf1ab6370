//! Strict startup loading and `validate_dir`: every bad pair is reported with its
//! file, what is wrong and how to fix it.

mod common;

use std::fs;

use common::*;
use space_certs::{validate_dir, CertError, CertStore};

fn expect_err(dir: &std::path::Path) -> CertError {
    match CertStore::load_dir(dir, None) {
        Ok(store) => panic!("expected an error, loaded {store:?}"),
        Err(e) => e,
    }
}

#[test]
fn bad_certificate_file_at_startup_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    write_flat(dir.path(), "good", &ca.issue(&["good.test"]));
    let bad = ca.issue(&["bad.test"]);
    let (bad_crt, _) = write_flat(dir.path(), "bad", &bad);
    fs::write(&bad_crt, "this is not a certificate\n").unwrap();

    let err = expect_err(dir.path());
    let text = err.to_string();
    assert!(text.contains(&bad_crt.display().to_string()), "{text}");
    assert!(text.contains("no certificate found in PEM"), "{text}");
    assert!(
        text.contains("fix: put the leaf certificate first"),
        "{text}"
    );
    let problems = err.problems();
    assert_eq!(problems.len(), 1, "{text}");
    assert_eq!(problems[0].path(), bad_crt);
    assert!(matches!(problems[0], CertError::NoCertificate { .. }));
}

#[test]
fn every_bad_pair_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new();
    write_flat(d, "good", &ca.issue(&["good.test"]));
    // Key from another issuance.
    let a = ca.issue(&["a.test"]);
    let b = ca.issue(&["b.test"]);
    fs::write(d.join("mismatch.crt"), &a.chain_pem).unwrap();
    fs::write(d.join("mismatch.key"), &b.key_pem).unwrap();
    // Certificate without key, key without certificate.
    fs::write(d.join("orphan.pem"), &a.chain_pem).unwrap();
    fs::write(d.join("lonely.key"), &a.key_pem).unwrap();
    // Key file without a key.
    fs::write(d.join("nokey.crt"), &a.chain_pem).unwrap();
    fs::write(d.join("nokey.key"), &a.chain_pem).unwrap();

    let err = expect_err(d);
    let text = err.to_string();
    let problems = err.problems();
    assert_eq!(problems.len(), 4, "{text}");
    assert!(
        matches!(problems[0], CertError::MissingCert { .. }),
        "{text}"
    );
    assert!(text.contains(&format!(
        "{}: private key does not match certificate {}",
        d.join("mismatch.key").display(),
        d.join("mismatch.crt").display()
    )));
    assert!(text.contains(&format!(
        "{} has no matching key file {}",
        d.join("orphan.pem").display(),
        d.join("orphan.key").display()
    )));
    assert!(text.contains(&format!(
        "{} has no matching certificate file {}",
        d.join("lonely.key").display(),
        d.join("lonely.crt").display()
    )));
    assert!(text.contains(&format!(
        "{}: no private key found",
        d.join("nokey.key").display()
    )));

    // validate_dir reports the same problems.
    assert_eq!(validate_dir(d).len(), 4);
}

#[test]
fn empty_directory_and_hidden_entries_hold_no_pair() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(expect_err(dir.path()), CertError::NoPairs { .. }));
    let ca = Ca::new();
    write_flat(dir.path(), ".hidden", &ca.issue(&["hidden.test"]));
    fs::write(dir.path().join("README.txt"), "not a pair").unwrap();
    assert!(matches!(expect_err(dir.path()), CertError::NoPairs { .. }));
    assert!(matches!(
        validate_dir(dir.path())[..],
        [CertError::NoPairs { .. }]
    ));
}

#[test]
fn missing_directory_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = expect_err(&missing);
    assert!(matches!(err, CertError::ReadDir { .. }));
    assert!(err.to_string().starts_with(&missing.display().to_string()));
}

#[test]
fn chain_in_wrong_order_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let issued = ca.issue(&["x.test"]);
    let blocks = pem_blocks(&issued);
    // CA first, then leaf.
    fs::write(
        dir.path().join("x.crt"),
        format!("{}{}", blocks[1], blocks[0]),
    )
    .unwrap();
    fs::write(dir.path().join("x.key"), &issued.key_pem).unwrap();
    let err = expect_err(dir.path());
    assert!(
        matches!(err.problems()[0], CertError::ChainOrder { index: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("out of order"));
}

fn pem_blocks(issued: &Issued) -> Vec<String> {
    issued
        .chain_pem
        .split_inclusive("-----END CERTIFICATE-----\n")
        .map(str::to_owned)
        .collect()
}

#[test]
fn key_in_certificate_file_and_encrypted_key_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let a = ca.issue(&["a.test"]);
    fs::write(dir.path().join("swapped.crt"), &a.key_pem).unwrap();
    fs::write(dir.path().join("swapped.key"), &a.chain_pem).unwrap();
    fs::write(dir.path().join("secret.crt"), &a.chain_pem).unwrap();
    fs::write(
        dir.path().join("secret.key"),
        // (Label split so that no file in the repository looks like a committed key.)
        concat!(
            "-----BEGIN ENCRYPTED ",
            "PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED ",
            "PRIVATE KEY-----\n"
        ),
    )
    .unwrap();
    let err = expect_err(dir.path());
    let problems = err.problems();
    assert!(
        matches!(problems[0], CertError::EncryptedKey { .. }),
        "{err}"
    );
    assert!(
        matches!(problems[1], CertError::KeyInCertFile { .. }),
        "{err}"
    );
}

#[test]
fn sec1_ec_private_key_loads() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let issued = ca.issue(&["sec1.test"]);
    let sec1 = pkcs8_to_sec1_pem(&issued.key_pem);
    assert!(sec1.starts_with(concat!("-----BEGIN EC ", "PRIVATE KEY-----")));
    fs::write(dir.path().join("sec1.crt"), &issued.chain_pem).unwrap();
    fs::write(dir.path().join("sec1.key"), sec1).unwrap();
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    assert_eq!(served(&store, Some("sec1.test")).unwrap(), issued.leaf);
}

/// Unwraps the SEC1 `ECPrivateKey` from a PKCS#8 `PrivateKeyInfo` (its privateKey OCTET STRING).
fn pkcs8_to_sec1_pem(pkcs8_pem: &str) -> String {
    use x509_parser::der_parser::{ber::BerObjectContent, der::parse_der};
    let der = rustls_pemfile::pkcs8_private_keys(&mut pkcs8_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    let (_, info) = parse_der(der.secret_pkcs8_der()).unwrap();
    let BerObjectContent::Sequence(fields) = info.content else {
        panic!("PKCS#8 is a SEQUENCE")
    };
    let BerObjectContent::OctetString(sec1) = fields[2].content else {
        panic!("privateKey is an OCTET STRING")
    };
    let b64 = base64_encode(sec1);
    let mut pem = String::from(concat!("-----BEGIN EC ", "PRIVATE KEY-----\n"));
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END EC PRIVATE KEY-----\n");
    pem
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn expired_certificate_loads_but_validate_dir_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let mut params = rcgen::CertificateParams::new(vec!["old.test".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let (crt, _) = write_flat(dir.path(), "old", &ca.issue_with(params));
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    let summary = store.summary();
    assert!(summary[0].expired);
    assert_eq!(summary[0].not_after_rfc3339, "2001-01-01T00:00:00Z");
    let problems = validate_dir(dir.path());
    assert_eq!(problems.len(), 1);
    assert!(matches!(problems[0], CertError::Expired { .. }));
    assert_eq!(problems[0].path(), crt);
    assert!(problems[0]
        .to_string()
        .contains("expired at 2001-01-01T00:00:00Z"));
}

#[test]
fn good_directory_validates_clean() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    write_flat(dir.path(), "a", &ca.issue(&["a.test"]));
    write_secret(dir.path(), "b", "v1", &ca.issue(&["b.test"]));
    assert!(validate_dir(dir.path()).is_empty());
}

#[test]
fn unknown_default_name_is_an_error_listing_the_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    write_flat(dir.path(), "a", &ca.issue(&["a.test"]));
    let err = CertStore::load_dir(dir.path(), Some("missing")).unwrap_err();
    assert!(
        matches!(err.problems()[0], CertError::DefaultNotFound { .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("default certificate `missing` not found (pairs: a)"));
}

#[test]
fn same_name_as_file_pair_and_secret_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    write_flat(dir.path(), "ehr", &ca.issue(&["ehr.test"]));
    write_secret(dir.path(), "ehr", "v1", &ca.issue(&["ehr.test"]));
    write_flat(dir.path(), "other", &ca.issue(&["other.test"]));
    let err = expect_err(dir.path());
    assert!(
        matches!(err.problems()[..], [CertError::DuplicateName { .. }]),
        "{err}"
    );
}

#[test]
fn half_written_secret_folder_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    write_flat(dir.path(), "a", &ca.issue(&["a.test"]));
    fs::create_dir(dir.path().join("portal")).unwrap();
    fs::write(
        dir.path().join("portal/tls.crt"),
        ca.issue(&["p.test"]).chain_pem,
    )
    .unwrap();
    // A folder without tls.* is not a pair and is ignored.
    fs::create_dir(dir.path().join("unrelated")).unwrap();
    let err = expect_err(dir.path());
    assert!(
        matches!(err.problems()[..], [CertError::MissingKey { .. }]),
        "{err}"
    );
    assert!(err.to_string().contains("portal/tls.key"));
}

#[test]
fn secret_mounted_as_the_directory_itself_loads_and_ignores_ca_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let issued = ca.issue(&["ehr.test"]);
    // cert-manager secret volume: tls.crt, tls.key, ca.crt (symlinks through ..data).
    let data = dir.path().join("..2024_01_01");
    fs::create_dir(&data).unwrap();
    fs::write(data.join("tls.crt"), &issued.chain_pem).unwrap();
    fs::write(data.join("tls.key"), &issued.key_pem).unwrap();
    fs::write(
        data.join("ca.crt"),
        issued
            .chain_pem
            .split_inclusive("-----END CERTIFICATE-----\n")
            .nth(1)
            .unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2024_01_01", dir.path().join("..data")).unwrap();
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).unwrap();
    }
    let store = CertStore::load_dir(dir.path(), None).unwrap();
    let names: Vec<_> = store.summary().into_iter().map(|s| s.name).collect();
    assert_eq!(names, vec!["tls".to_owned()]);
    assert_eq!(served(&store, Some("ehr.test")).unwrap(), issued.leaf);
    assert!(validate_dir(dir.path()).is_empty());
}
